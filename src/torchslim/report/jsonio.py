"""Write a run's report files and read its record back.

Every file is written atomically (a temporary file in the same folder, then ``os.replace``),
so an interrupted write never leaves a half-written report or record behind.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from torchslim.errors import OutputError
from torchslim.report.html import CAPTIONS, SAMPLE_CAPTIONS, render_html
from torchslim.report.markdown import render_markdown
from torchslim.report.record import RunRecord

__all__ = ["read_record", "write_report"]

logger = logging.getLogger(__name__)

RECORD = "record.json"


def _atomic_write(path: Path, data: bytes) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            tmp.replace(path)  # os.replace: atomic within one file system
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return path


def write_report(record: RunRecord, folder: Path) -> list[Path]:
    """Write ``record.json``, ``report.md``, ``report.html`` and ``plots/*.png`` into ``folder``.

    Sample previews of data-free methods already in ``folder/plots`` are embedded too.

    Plots need matplotlib (the ``report`` extra); without it the report is written without
    them and a warning is logged.

    Args:
        record: The run to write.
        folder: The output folder; created when missing.

    Returns:
        The paths written, record first.
    """
    folder = Path(folder)
    if importlib.util.find_spec("matplotlib") is not None:
        from torchslim.report.plots import make_plots

        plots = make_plots(record)
    else:
        logger.warning("matplotlib is not installed: writing the report without plots "
                       "(pip install 'torchslim[report]')")
        plots = {}
    for name in SAMPLE_CAPTIONS:  # previews written by data-free methods are embedded as they are
        if (folder / "plots" / name).is_file():
            plots[name] = (folder / "plots" / name).read_bytes()
    written = [
        _atomic_write(folder / RECORD, record.to_json().encode("utf-8")),
        _atomic_write(folder / "report.md", render_markdown(record).encode("utf-8")),
        _atomic_write(folder / "report.html", render_html(record, plots).encode("utf-8")),
    ]
    written += [_atomic_write(folder / "plots" / name, png) for name, png in plots.items()
                if name not in SAMPLE_CAPTIONS]
    for name in set(CAPTIONS) - set(plots):  # a re-render must not keep a plot that no longer applies
        (folder / "plots" / name).unlink(missing_ok=True)
    return written


def _check(record: RunRecord, path: Path) -> None:
    """Raise OutputError when a field has the wrong kind of value."""
    expect: list[tuple[str, Any, type | tuple[type, ...]]] = [
        ("recipe", record.recipe, dict), ("environment", record.environment, dict),
        ("structure", record.structure, dict), ("completed_stages", record.completed_stages, int),
    ]
    expect += [(f"metrics[{i}].values", m.values, dict) for i, m in enumerate(record.metrics)]
    expect += [(f"deployments[{i}].values", d.values, dict) for i, d in enumerate(record.deployments)]
    expect += [(f"samples[{i}].{k}", getattr(s, k), str) for i, s in enumerate(record.samples)
               for k in ("prompt", "before", "after")]
    for i, o in enumerate(record.outcomes):
        expect += [(f"outcomes[{i}].stats", o.stats, dict), (f"outcomes[{i}].layers", o.layers, dict),
                   (f"outcomes[{i}].touched", o.touched, list), (f"outcomes[{i}].seconds", o.seconds,
                                                                  (int, float))]
        expect.append((f"outcomes[{i}].fronts", o.fronts, dict))
        for key, points in (o.fronts.items() if isinstance(o.fronts, dict) else ()):
            pairs = isinstance(points, list) and all(
                isinstance(p, list) and len(p) == 2 and all(isinstance(v, (int, float)) for v in p)
                for p in points)
            if not pairs:
                raise OutputError(f"{path}: outcomes[{i}].fronts[{key!r}] should be a list of "
                                  "[x, y] numbers")
    for where, value, kind in expect:
        if not isinstance(value, kind):
            raise OutputError(f"{path}: {where} should be a {getattr(kind, '__name__', 'number')}, "
                              f"found {type(value).__name__}")


def read_record(folder: Path) -> RunRecord:
    """Read ``folder/record.json``.

    Raises:
        OutputError: The file is missing, is not JSON, or does not describe a run.
    """
    path = Path(folder) / RECORD
    if not path.is_file():
        raise OutputError(f"{path} does not exist: expected the output folder of a torchslim run")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise OutputError(f"{path} is not readable JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise OutputError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    try:
        record = RunRecord.from_dict(raw)
    except KeyError as exc:
        raise OutputError(f"{path}: the record has no {exc.args[0]!r} entry") from exc
    except (TypeError, ValueError, AttributeError) as exc:
        raise OutputError(f"{path}: not a torchslim run record ({exc})") from exc
    _check(record, path)
    return record
