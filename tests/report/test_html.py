from __future__ import annotations

import base64
import dataclasses
from html.parser import HTMLParser

from torchslim.report.html import render_html
from torchslim.report.record import OutcomeRow, RunRecord

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(40))


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.images: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"] or "")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(page: str) -> _Collect:
    parser = _Collect()
    parser.feed(page)
    return parser


def test_plots_are_embedded_as_data_uris_and_nothing_is_fetched(record: RunRecord) -> None:
    plots = {"metric_vs_size.png": PNG, "layers.png": PNG + b"x", "latency.png": PNG + b"yy"}
    page = render_html(record, plots)
    assert page.count('<img src="data:image/png;base64,') == len(plots)
    parsed = _parse(page)
    decoded = [base64.b64decode(src.split(",", 1)[1]) for src in parsed.images]
    assert decoded == list(plots.values())
    assert "http" not in page.lower()
    assert "script" not in parsed.tags and "link" not in parsed.tags
    assert "<style>" in page


def test_same_content_as_markdown_in_tables(record: RunRecord) -> None:
    parsed = _parse(render_html(record, {}))
    assert parsed.tags.count("table") == 2  # metrics and deployments
    text = " ".join(parsed.text)
    assert "0.065" in text and "4.26×" in text and "91.23%" in text
    assert "pruning.channel" in text and "zoo:fashion_cnn" in text
    assert "img" not in parsed.tags


def test_all_text_is_escaped(record: RunRecord) -> None:
    hostile = OutcomeRow(stage="<script>alert(1)</script>", method="a&b", config={}, touched=[],
                         stats={}, layers={}, seconds=0.0)
    page = render_html(dataclasses.replace(record, outcomes=[hostile]), {})
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "a&amp;b" in page
