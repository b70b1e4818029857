from __future__ import annotations

import dataclasses
import struct

import matplotlib
import pytest

from torchslim.report.plots import make_plots
from torchslim.report.record import RunRecord

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _size(png: bytes) -> tuple[int, int]:
    assert png[:8] == PNG_MAGIC and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    return width, height


def test_every_plot_with_data_is_a_small_png(record: RunRecord) -> None:
    backend = matplotlib.get_backend()
    plots = make_plots(record)
    assert set(plots) == {"metric_vs_size.png", "layers.png", "latency.png"}
    for png in plots.values():
        width, height = _size(png)
        assert 200 <= width <= 1600 and 200 <= height <= 1600
    assert matplotlib.get_backend() == backend  # no global backend switch


@pytest.mark.parametrize(
    ("change", "missing"),
    [
        ({"deployments": []}, "latency.png"),
        ({"outcomes": []}, "layers.png"),
        ({"metrics": []}, "metric_vs_size.png"),
    ],
)
def test_plots_without_data_are_skipped(record: RunRecord, change: dict[str, list[object]],
                                        missing: str) -> None:
    plots = make_plots(dataclasses.replace(record, **change))  # type: ignore[arg-type]
    assert missing not in plots and len(plots) == 2


def test_metric_plot_needs_a_task_metric(record: RunRecord) -> None:
    for row in record.metrics:
        row.values.pop("accuracy")
    assert "metric_vs_size.png" not in make_plots(record)


def test_pareto_plot_draws_reported_fronts_and_survives_the_json_round_trip(record: RunRecord,
                                                                            tmp_path: object) -> None:
    from pathlib import Path

    from torchslim.errors import OutputError
    from torchslim.report.jsonio import read_record, write_report

    assert "pareto.png" not in make_plots(record)
    record.outcomes[1].fronts = {"average bits|error": [[3.0, 9.5], [4.0, 2.0], [8.0, 0.01]]}
    width, height = _size(make_plots(record)["pareto.png"])
    assert width >= 200 and height >= 200
    folder = Path(str(tmp_path))
    write_report(record, folder)
    assert (folder / "plots" / "pareto.png").is_file()
    assert read_record(folder).outcomes[1].fronts == record.outcomes[1].fronts
    import json

    raw = json.loads((folder / "record.json").read_text())
    raw["outcomes"][1]["fronts"] = {"bits|error": [[1.0, "x"]]}
    (folder / "record.json").write_text(json.dumps(raw))
    with pytest.raises(OutputError, match="fronts"):
        read_record(folder)
