from __future__ import annotations

import dataclasses

import yaml

from torchslim.report.markdown import render_markdown
from torchslim.report.record import MetricsRow, RunRecord


def _row(text: str, title: str) -> list[str]:
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("|") and cells[0] == title:
            return cells
    raise AssertionError(f"no table row {title!r} in\n{text}")


def test_metrics_table_has_a_column_per_stage_and_the_after_before_ratio(record: RunRecord) -> None:
    text = render_markdown(record)
    header = _row(text, "metric")
    assert header == ["metric", "before", "prune", "quantize", "after/before"]
    for title, key in (("size", "size_bytes"), ("params", "params"), ("FLOPs", "flops"),
                       ("latency", "latency_ms"), ("accuracy", "accuracy")):
        cells = _row(text, title)
        assert len(cells) == len(header)
        expected = record.metrics[-1].values[key] / record.metrics[0].values[key]
        assert cells[-1] == f"{expected:.3f}"
    assert _row(text, "size")[-1] == "0.065"  # 110240 / 1687512


def test_values_use_human_units(record: RunRecord) -> None:
    text = render_markdown(record)
    assert _row(text, "accuracy")[1:4] == ["91.23%", "90.50%", "90.31%"]
    assert _row(text, "size")[1] == "1.69 MB"
    assert _row(text, "FLOPs")[1] == "12.3 MFLOPs"
    assert _row(text, "params")[1] == "421,642"
    assert _row(text, "latency")[3] == "0.298 ms"


def test_deployment_rows_have_a_speedup_relative_to_the_first(record: RunRecord) -> None:
    text = render_markdown(record)
    header = _row(text, "name")
    assert header[:2] == ["name", "engine"] and "speedup" in header and header[-1] == "note"
    column = header.index("speedup")
    rows = [line for line in text.splitlines() if line.startswith(("| original", "| compressed"))]
    assert len(rows) == len(record.deployments)
    first = record.deployments[0].values["latency_ms"]
    for line, deployment in zip(rows, record.deployments):
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        assert cells[column] == f"{first / deployment.values['latency_ms']:.2f}×"
    assert "max \\|diff\\| vs PyTorch" in text  # pipes in a note are escaped, not new columns


def test_one_line_per_outcome_and_the_recipe_as_yaml(record: RunRecord) -> None:
    text = render_markdown(record)
    lines = [line for line in text.splitlines() if line.startswith("- `")]
    assert len(lines) == len(record.outcomes)
    assert "`prune` / `pruning.channel`" in lines[0] and "3 layers touched" in lines[0]
    assert "0.42 s" in lines[0] and "ratio 0.5" in lines[0]
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(block) == record.recipe
    assert "AMD EPYC 7B13" in text and "torch 2.14.1" in text


def test_interrupted_and_empty_records_render(record: RunRecord) -> None:
    interrupted = dataclasses.replace(record, metrics=record.metrics[:2], completed_stages=1,
                                      deployments=[])
    text = render_markdown(interrupted)
    assert "1 of 2 stages finished" in text and "## Deployment" not in text
    assert _row(text, "size")[-1] == f"{423880 / 1687512:.3f}"
    empty = render_markdown(RunRecord(recipe={"stages": []}, environment={}))
    assert empty.startswith("# torchslim report") and "## Metrics" not in empty


def test_missing_values_and_zero_baselines_show_a_dash() -> None:
    record = RunRecord(recipe={"stages": [{"name": "s"}]}, environment={}, completed_stages=1, metrics=[
        MetricsRow("before", {"params": 10.0, "flops": 0.0}),
        MetricsRow("s", {"params": 5.0, "flops": 0.0, "perplexity": 12.5}),
    ])
    text = render_markdown(record)
    assert _row(text, "FLOPs")[-1] == "–"
    assert _row(text, "perplexity")[1:] == ["–", "12.5", "–"]
    assert _row(text, "params")[-1] == "0.500"
