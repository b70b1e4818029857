"""PNG plots of a run, drawn with matplotlib's object API on the Agg canvas.

No pyplot and no global backend switch, so calling this from a notebook or a GUI program
leaves its matplotlib state alone. A plot whose data is missing is skipped, not drawn empty.
"""

from __future__ import annotations

import io
import logging
from typing import TYPE_CHECKING, Any

from torchslim.report import _format
from torchslim.report.record import OutcomeRow, RunRecord

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["make_plots"]

logger = logging.getLogger(__name__)

_DPI = 100


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=_DPI, layout="constrained")


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


def _task_key(record: RunRecord) -> str | None:
    for row in record.metrics:
        keys = _format.task_keys(row.values)
        if keys:
            return keys[0]
    return None


def _metric_vs_size(record: RunRecord) -> bytes | None:
    key = _task_key(record)
    points = [(row.label, row.values["size_bytes"], row.values[key]) for row in record.metrics
              if key is not None and "size_bytes" in row.values and key in row.values]
    if key is None or not points:
        return None
    percent = _format.is_percent(key, [p[2] for p in points])
    divisor, unit = (1e6, "MB") if max(p[1] for p in points) >= 1e6 else (1e3, "KB")
    xs = [p[1] / divisor for p in points]
    ys = [p[2] * (100 if percent else 1) for p in points]
    fig = _figure(6, 4)
    ax = fig.add_subplot()
    ax.plot(xs, ys, "-o", color="#3070b0")
    for (label, _, _), x, y in zip(points, xs, ys):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=9)
    ax.margins(0.12)  # room for the labels of the extreme points
    ax.set_xlabel(f"serialized size ({unit})")
    ax.set_ylabel(f"{key} (%)" if percent else key)
    ax.set_title(f"{key} vs size")
    ax.grid(alpha=0.3)
    return _png(fig)


def _layer_series(outcome: OutcomeRow) -> tuple[str, list[str], list[float]] | None:
    """(value name, layer fqns, values) of the first numeric per-layer key of an outcome."""
    for stats in outcome.layers.values():
        for name, value in stats.items():
            if isinstance(value, (int, float)):
                pairs = [(fqn, float(s[name])) for fqn, s in outcome.layers.items()
                         if isinstance(s.get(name), (int, float))]
                return name, [p[0] for p in pairs], [p[1] for p in pairs]
    return None


def _layers(record: RunRecord) -> bytes | None:
    series = [(o, s) for o in record.outcomes if (s := _layer_series(o)) is not None]
    if not series:
        return None
    most = max(len(s[1]) for _, s in series)
    fig = _figure(min(max(6.0, 0.3 * most + 2), 16.0), 2.2 + 2.8 * len(series))
    axes: Any = fig.subplots(len(series), 1, squeeze=False)
    for ax, (outcome, (name, fqns, values)) in zip(axes[:, 0], series):
        ax.bar(range(len(values)), values, color="#5a9a5a")
        many = len(fqns) > 8
        ax.set_xticks(range(len(fqns)), fqns, rotation=90 if many else 30, fontsize=7 if many else 8,
                      ha="center" if many else "right")
        ax.set_ylabel(name)
        ax.set_title(f"{outcome.stage} / {outcome.method}: {name} per layer", fontsize=10)
        if all(0.0 <= v <= 1.0 for v in values):
            ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def _latency(record: RunRecord) -> bytes | None:
    rows = [r for r in record.deployments if isinstance(r.values.get("latency_ms"), (int, float))]
    if not rows:
        return None
    values = [float(r.values["latency_ms"]) for r in rows]
    fig = _figure(max(5.0, 1.6 * len(rows)), 4)
    ax = fig.add_subplot()
    bars = ax.bar(range(len(rows)), values, color="#c07030")
    ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], fontsize=8)
    ax.set_xticks(range(len(rows)), [f"{r.name}\n{r.engine}" for r in rows], fontsize=8)
    ax.set_ylabel("latency (ms, median)")
    ax.set_title("deployed latency")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def _pareto(record: RunRecord) -> bytes | None:
    curves = [(o, key, pts) for o in record.outcomes for key, pts in o.fronts.items() if len(pts) >= 2]
    if not curves:
        return None
    fig = _figure(6.5, 2.2 + 2.8 * len(curves))
    axes: Any = fig.subplots(len(curves), 1, squeeze=False)
    for ax, (outcome, key, pts) in zip(axes[:, 0], curves):
        x_name, _, y_name = key.partition("|")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="#3a6ea5", markersize=4)
        ax.set_xlabel(x_name)
        ax.set_ylabel(y_name or "value")
        if all(p[1] > 0 for p in pts) and max(p[1] for p in pts) > 100 * min(p[1] for p in pts):
            ax.set_yscale("log")
        ax.set_title(f"{outcome.stage} / {outcome.method}: {y_name} vs {x_name}", fontsize=10)
        ax.grid(alpha=0.3)
    return _png(fig)


def make_plots(record: RunRecord) -> dict[str, bytes]:
    """Draw the plots the record has data for.

    Args:
        record: The run to plot.

    Returns:
        File name -> PNG bytes, among ``metric_vs_size.png`` (task metric vs serialized size
        per stage), ``layers.png`` (per-layer values of each method that reports them) and
        ``latency.png`` (latency of each deployed artifact) and ``pareto.png`` (the
        trade-off curves methods report, e.g. the bit-allocation front of
        ``quantization.mixed``).
    """
    makers = {"metric_vs_size.png": _metric_vs_size, "layers.png": _layers, "latency.png": _latency,
              "pareto.png": _pareto}
    plots = {}
    for name, make in makers.items():
        png = make(record)
        if png is not None:
            plots[name] = png
        else:
            logger.debug("plot %s skipped: the record has no data for it", name)
    return plots
