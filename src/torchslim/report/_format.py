"""What every report shows, as plain strings: the renderers only add Markdown or HTML markup.

Numbers get human units, one unit per table row so a row reads at a glance: bytes in
B/KB/MB/GB (SI, 1 KB = 1000 B), FLOPs in MFLOPs (GFLOPs from 1e9), latency in ms, accuracy
in percent and parameter counts with thousands separators.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from typing import Any

from torchslim.report.record import RunRecord

__all__ = ["Table", "deployment_table", "environment_line", "format_row", "metrics_table",
           "outcome_lines", "recipe_yaml", "status_line", "task_keys"]

logger = logging.getLogger(__name__)

MISSING = "–"
# Keys written by torchslim.measure; every other key of a metrics row comes from eval_fn.
MEASURE_KEYS = ("params", "params_nonzero", "size_bytes", "flops", "latency_ms")
_LABELS = {"params": "params", "params_nonzero": "params (nonzero)", "size_bytes": "size",
           "flops": "FLOPs", "latency_ms": "latency"}
_PERCENT = ("accuracy", "acc", "top1", "top5")


@dataclasses.dataclass
class Table:
    """Header and body cells, already formatted; ``numeric`` marks right-aligned columns."""

    headers: list[str]
    rows: list[list[str]]
    numeric: list[bool]


def task_keys(values: dict[str, float]) -> list[str]:
    """Keys of a metrics row that came from the user's ``eval_fn``, in order."""
    return [key for key in values if key not in MEASURE_KEYS and not key.startswith("latency_")]


def label(key: str) -> str:
    """Column or row title for a metric key."""
    return _LABELS.get(key, key)


def _num(x: float, digits: int = 3) -> str:
    if x != x or x in (float("inf"), float("-inf")):  # nan and inf print as they are
        return str(x)
    if abs(x) >= 10**digits:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def _scale(key: str, peak: float) -> tuple[float, str]:
    """(divisor, unit suffix) for a row whose largest magnitude is ``peak``."""
    if key.endswith("bytes"):
        for divisor, unit in ((1e9, " GB"), (1e6, " MB"), (1e3, " KB")):
            if peak >= divisor:
                return divisor, unit
        return 1.0, " B"
    if key.endswith("flops"):
        return (1e9, " GFLOPs") if peak >= 1e9 else (1e6, " MFLOPs")
    if key.endswith("_ms"):
        return 1.0, " ms"
    return 1.0, ""


def is_percent(key: str, values: Sequence[float | None]) -> bool:
    """Whether a row holds fractions to show as percent (accuracy-like keys in [0, 1])."""
    words = key.lower().replace("-", "_").split("_")
    named = any(word in words for word in _PERCENT)
    return named and all(v is None or 0.0 <= v <= 1.0 for v in values)


def format_row(key: str, values: Sequence[float | None]) -> list[str]:
    """Format the values of one metric with one unit chosen for the whole row."""
    present = [float(v) for v in values if v is not None]
    if key.startswith("params"):
        return [MISSING if v is None else f"{int(v):,}" for v in values]
    if is_percent(key, values):
        return [MISSING if v is None else f"{100 * v:.2f}%" for v in values]
    divisor, unit = _scale(key, max((abs(v) for v in present), default=0.0))
    digits = 3 if unit else 4
    return [MISSING if v is None else _num(float(v) / divisor, digits) + unit for v in values]


def ratio(after: float | None, before: float | None) -> str:
    """``after / before`` with three decimals, or a dash when undefined."""
    if after is None or before is None or before == 0:
        return MISSING
    return f"{after / before:.3f}"


def metrics_table(record: RunRecord) -> Table | None:
    """Metric rows by stage columns (``before``, each stage) plus an after/before column."""
    if not record.metrics:
        return None
    keys: list[str] = []
    for row in record.metrics:
        keys += [key for key in row.values if key not in keys]
    body = []
    for key in keys:
        values = [row.values.get(key) for row in record.metrics]
        body.append([label(key), *format_row(key, values), ratio(values[-1], values[0])])
    headers = ["metric", *(row.label for row in record.metrics), "after/before"]
    return Table(headers, body, [False] + [True] * (len(headers) - 1))


def deployment_table(record: RunRecord) -> Table | None:
    """One row per deployed artifact; speedup is the first row's latency over each row's."""
    rows = record.deployments
    if not rows:
        return None
    keys: list[str] = []
    for row in rows:
        keys += [key for key in row.values if key not in keys]
    columns = {key: format_row(key, [row.values.get(key) for row in rows]) for key in keys}
    base = rows[0].values.get("latency_ms")
    show_speedup = bool(base) and "latency_ms" in keys
    body = []
    for i, row in enumerate(rows):
        cells = [row.name, row.engine, *(columns[key][i] for key in keys)]
        if show_speedup:
            latency = row.values.get("latency_ms")
            cells.append(f"{base / latency:.2f}×" if base and latency else MISSING)
        body.append([*cells, row.note])
    speedup = ["speedup"] if show_speedup else []
    headers = ["name", "engine", *(label(key) for key in keys), *speedup, "note"]
    numeric = [False, False, *([True] * (len(headers) - 3)), False]
    return Table(headers, body, numeric)


def outcome_lines(record: RunRecord) -> list[tuple[str, str, str]]:
    """(stage, method, summary) per method outcome; the summary lists stats, touched, time."""
    lines = []
    for outcome in record.outcomes:
        parts = [f"{key} {_stat(value)}" for key, value in outcome.stats.items()]
        count = len(outcome.touched)
        parts.append(f"{count} layer{'' if count == 1 else 's'} touched")
        parts.append(f"{outcome.seconds:.2f} s")
        lines.append((outcome.stage, outcome.method, ", ".join(parts)))
    return lines


def _stat(value: Any) -> str:
    return _num(float(value), 4) if isinstance(value, (int, float)) else str(value)


def environment_line(env: dict[str, Any]) -> str:
    """One line: versions, CPU, threads, device, input shape and time."""
    parts = [f"{name} {env[key]}" for key, name in (("torchslim", "torchslim"), ("torch", "torch"),
                                                      ("python", "Python")) if env.get(key)]
    for key in ("gpu", "cpu"):
        if env.get(key):
            parts.append(str(env[key]))
    if env.get("threads"):
        parts.append(f"{env['threads']} threads")
    if env.get("device"):
        parts.append(f"device {env['device']}")
    for key in ("onnxruntime", "onnx"):
        if env.get(key):
            parts.append(f"{key} {env[key]}")
    if env.get("example_input_shape"):
        parts.append(f"input {'×'.join(str(d) for d in env['example_input_shape'])}")
    if env.get("timestamp"):
        parts.append(str(env["timestamp"]))
    return " · ".join(parts)


def status_line(record: RunRecord) -> str | None:
    """A warning when the run stopped before its last stage, else None."""
    planned = len(record.recipe.get("stages", []) or [])
    done = max(record.completed_stages, len(record.metrics) - 1)  # metrics: before + one per stage
    if done >= planned:
        return None
    return f"Incomplete run: {done} of {planned} stages finished."


def recipe_yaml(record: RunRecord) -> str:
    """The resolved recipe as YAML text."""
    import yaml

    plain = json.loads(json.dumps(record.recipe, default=str))  # tuples -> lists, objects -> str
    text: str = yaml.safe_dump(plain, sort_keys=False, default_flow_style=None, allow_unicode=True)
    return text
