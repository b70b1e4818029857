from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest

from torchslim.errors import OutputError
from torchslim.report.jsonio import read_record, write_report
from torchslim.report.record import RunRecord

REPORT_SRC = Path(__file__).resolve().parents[2] / "src" / "torchslim" / "report"


def test_write_report_then_read_record_round_trips(record: RunRecord, tmp_path: Path) -> None:
    out = tmp_path / "run"
    written = write_report(record, out)
    names = {p.relative_to(out).as_posix() for p in written}
    assert {"record.json", "report.md", "report.html", "plots/metric_vs_size.png", "plots/layers.png",
            "plots/latency.png"} == names
    assert all(p.is_file() and p.stat().st_size > 0 for p in written)
    assert not list(out.rglob("*.tmp"))
    assert read_record(out) == record
    assert (out / "plots" / "layers.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 3


def test_rerender_drops_plots_that_no_longer_apply(record: RunRecord, tmp_path: Path) -> None:
    write_report(record, tmp_path)
    write_report(dataclasses.replace(record, deployments=[]), tmp_path)
    assert not (tmp_path / "plots" / "latency.png").exists()
    assert (tmp_path / "plots" / "layers.png").is_file()
    assert read_record(tmp_path).deployments == []


def test_missing_record_is_an_output_error(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="record.json does not exist"):
        read_record(tmp_path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"recipe": {}, "environment": ', "not readable JSON"),
        ("[1, 2]", "expected a JSON object, found list"),
        ('{"environment": {}}', "no 'recipe' entry"),
        ('{"recipe": {}, "environment": {}, "metrics": [{"label": "x", "valuez": {}}]}', "not a torchslim"),
        ('{"recipe": {}, "environment": {}, "metrics": [{"label": "x", "values": 3}]}',
         r"metrics\[0\].values should be a dict, found int"),
        ('{"recipe": [], "environment": {}}', "recipe should be a dict"),
    ],
)
def test_malformed_record_is_an_output_error(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "record.json").write_text(text)
    with pytest.raises(OutputError, match=message):
        read_record(tmp_path)


def test_the_record_file_is_the_records_json(record: RunRecord, tmp_path: Path) -> None:
    write_report(record, tmp_path)
    assert json.loads((tmp_path / "record.json").read_text()) == record.to_dict()


def test_report_modules_do_not_import_torch_at_module_level() -> None:
    for path in REPORT_SRC.glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n.split(".")[0] in ("torch", "matplotlib")], path.name
