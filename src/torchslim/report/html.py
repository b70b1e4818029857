"""The run report as one self-contained HTML page.

Inline CSS, plots embedded as base64 data URIs, no scripts and no external resources: the file
can be mailed, archived or opened offline and looks the same. All text is escaped.
"""

from __future__ import annotations

import base64
import logging
from html import escape

from torchslim.report import _format
from torchslim.report._format import Table
from torchslim.report.record import RunRecord

__all__ = ["render_html"]

logger = logging.getLogger(__name__)

CAPTIONS = {
    "metric_vs_size.png": "Task metric against serialized size, one point per stage",
    "layers.png": "Per-layer result of each method",
    "latency.png": "Measured latency of each deployed artifact (median)",
    "pareto.png": "Trade-off curves reported by the methods (e.g. bit allocation: size vs error)",
}
# Written by data-free distillation methods during the run (not drawn from the record).
SAMPLE_CAPTIONS = {
    "datafree-samples.png": "Synthetic samples of distillation.datafree (teacher's class above each)",
    "inversion-samples.png": "Synthetic samples of distillation.inversion (class each was made for above it)",
}

_CSS = """
body { font: 15px/1.45 system-ui, sans-serif; color: #222; margin: 0; background: #fafafa; }
main { max-width: 1000px; margin: 0 auto; padding: 1.5em 2em; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: .2em; }
h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.env { color: #666; font-size: .9em; }
.warn { background: #fff3cd; padding: .5em .8em; border-radius: 4px; }
table { border-collapse: collapse; margin: .6em 0; font-size: .92em; }
th, td { padding: .3em .7em; border-bottom: 1px solid #e4e4e4; text-align: left; }
th { background: #f2f2f2; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
code, pre { font-family: ui-monospace, monospace; font-size: .9em; }
pre { background: #f5f5f5; padding: .8em; overflow-x: auto; }
figure { margin: 1em 0; }
figure img { max-width: 100%; }
figcaption { color: #666; font-size: .9em; }
"""


def _table(table: Table) -> str:
    def cells(tag: str, values: list[str]) -> str:
        return "".join(
            f'<{tag} class="num">{escape(v)}</{tag}>' if right else f"<{tag}>{escape(v)}</{tag}>"
            for v, right in zip(values, table.numeric)
        )

    body = "".join(f"<tr>{cells('td', row)}</tr>" for row in table.rows)
    return f"<table><thead><tr>{cells('th', table.headers)}</tr></thead><tbody>{body}</tbody></table>"


def _figures(plots: dict[str, bytes]) -> list[str]:
    out = []
    for name, png in plots.items():
        data = base64.b64encode(png).decode("ascii")
        caption = escape(CAPTIONS.get(name) or SAMPLE_CAPTIONS.get(name, name))
        out.append(f'<figure><img src="data:image/png;base64,{data}" alt="{caption}">'
                   f"<figcaption>{caption}</figcaption></figure>")
    return out


def _outcomes(record: RunRecord) -> list[str]:
    items = [f"<li><code>{escape(stage)}</code> / <code>{escape(method)}</code>: {escape(summary)}</li>"
             for stage, method, summary in _format.outcome_lines(record)]
    return ["<h2>Methods</h2>", "<ul>", *items, "</ul>"] if items else []


def render_html(record: RunRecord, plots: dict[str, bytes]) -> str:
    """Render ``record`` and its ``plots`` (file name -> PNG bytes) as one HTML page.

    Args:
        record: The run to describe.
        plots: PNG images to embed, in order; may be empty.

    Returns:
        The page, with the same content as ``render_markdown`` plus the plots.
    """
    model = record.recipe.get("model")
    title = escape(f"torchslim report{f': {model}' if model else ''}")
    env = escape(_format.environment_line(record.environment))
    parts = [f"<h1>{title}</h1>", f'<p class="env">{env}</p>']
    status = _format.status_line(record)
    if status:
        parts.append(f'<p class="warn">{escape(status)}</p>')
    metrics = _format.metrics_table(record)
    if metrics is not None:
        parts += ["<h2>Metrics</h2>", _table(metrics)]
    deployments = _format.deployment_table(record)
    if deployments is not None:
        parts += ["<h2>Deployment</h2>", _table(deployments)]
    parts += ["<h2>Samples</h2>"] if record.samples else []
    for sample in record.samples:
        parts += [f"<p>Prompt: <q>{escape(sample.prompt)}</q></p>",
                  f"<ul><li>before: <q>{escape(sample.before)}</q></li>"
                  f"<li>after: <q>{escape(sample.after)}</q></li></ul>"]
    parts += _outcomes(record)
    if plots:
        parts += ["<h2>Plots</h2>", *_figures(plots)]
    parts += ["<h2>Recipe</h2>", f"<pre><code>{escape(_format.recipe_yaml(record))}</code></pre>"]
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{title}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n{body}\n"
            f"</main>\n</body>\n</html>\n")
