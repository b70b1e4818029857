"""The run report as Markdown: what the CLI prints and what ``report.md`` holds."""

from __future__ import annotations

import logging

from torchslim.report import _format
from torchslim.report._format import Table
from torchslim.report.record import RunRecord

__all__ = ["render_markdown"]

logger = logging.getLogger(__name__)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(table: Table) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in table.headers) + " |"]
    lines.append("|" + "|".join("---:" if right else "---" for right in table.numeric) + "|")
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in table.rows]
    return lines


def render_markdown(record: RunRecord) -> str:
    """Render ``record``: environment, metrics per stage, deployments, methods, recipe.

    Args:
        record: The run to describe.

    Returns:
        Markdown text ending in a newline.
    """
    model = record.recipe.get("model")
    lines = [f"# torchslim report{f': {model}' if model else ''}", ""]
    env = _format.environment_line(record.environment)
    if env:
        lines += [env, ""]
    status = _format.status_line(record)
    if status:
        lines += [f"**{status}**", ""]
    metrics = _format.metrics_table(record)
    if metrics is not None:
        lines += ["## Metrics", "", *_table(metrics), ""]
    deployments = _format.deployment_table(record)
    if deployments is not None:
        lines += ["## Deployment", "", *_table(deployments), ""]
    lines += ["## Samples", ""] if record.samples else []
    for sample in record.samples:
        lines += [f"Prompt: {sample.prompt!r}", "",
                  f"- before: {sample.before!r}", f"- after: {sample.after!r}", ""]
    outcomes = _format.outcome_lines(record)
    if outcomes:
        lines += ["## Methods", ""]
        lines += [f"- `{stage}` / `{method}`: {summary}" for stage, method, summary in outcomes]
        lines.append("")
    lines += ["## Recipe", "", "```yaml", _format.recipe_yaml(record).rstrip("\n"), "```", ""]
    return "\n".join(lines)
