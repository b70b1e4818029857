"""Save a compressed model as a run folder and rebuild it from there without running code.

A folder holds ``model.safetensors`` (weights, zeros stored compactly), ``structure.json``
(how to turn a freshly built base model into the compressed architecture), ``recipe.yaml``
(the resolved recipe) and ``record.json`` (the run record). Reading it uses only
safetensors and JSON, and rebuilds only classes in ``core.structure``'s allow-list.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import yaml
from torch import nn
from torch.nn.utils import parametrize

from torchslim.core import structure
from torchslim.core.storage import load_state_dict_into, save_state_dict, temp_path
from torchslim.errors import ModelError, OutputError

__all__ = ["FILES", "SavedResult", "is_run_folder", "load", "read_structure", "save"]

logger = logging.getLogger(__name__)

FORMAT = "torchslim-structure"
VERSION = 1
WEIGHTS, STRUCTURE, RECIPE, RECORD = "model.safetensors", "structure.json", "recipe.yaml", "record.json"
FILES = (WEIGHTS, STRUCTURE, RECIPE, RECORD)


class _Record(Protocol):
    @property
    def recipe(self) -> dict[str, Any]: ...

    @property
    def structure(self) -> dict[str, dict[str, Any]]: ...

    def to_json(self) -> str: ...


class SavedResult(Protocol):
    """What ``save`` needs: a ``torchslim.Result`` (a model and its ``RunRecord``)."""

    @property
    def model(self) -> nn.Module: ...

    @property
    def record(self) -> _Record: ...


def save(result: SavedResult, folder: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``result`` to ``folder``: weights, structure, resolved recipe and record.

    Every file is written to a temporary name first and renamed only once all four are
    complete, so a failure leaves the folder as it was.

    Args:
        result: What ``torchslim.compress`` or ``torchslim.apply`` returned.
        folder: The output folder; created if missing.
        overwrite: Also write into a non-empty folder that is not a torchslim run. Only
            the four files above are replaced; nothing else in the folder is touched.

    Returns:
        The folder.

    Raises:
        OutputError: The folder is foreign and ``overwrite`` is False, the model holds a
            changed module that cannot be rebuilt, or a file cannot be written.
    """
    folder = Path(folder)
    _check_folder(folder, overwrite=overwrite)
    texts = _texts(result)  # may fail: nothing is written before this succeeds
    created = _make_folder(folder)
    staged: dict[str, Path] = {}
    try:
        staged[WEIGHTS] = temp_path(folder / WEIGHTS)
        save_state_dict(result.model, staged[WEIGHTS])
        for name, text in texts.items():
            staged[name] = temp_path(folder / name)
            staged[name].write_text(text, encoding="utf-8")
        for name in FILES:  # record.json last: its presence marks a complete save
            staged[name].replace(folder / name)
    except OSError as exc:
        raise OutputError(f"cannot write {folder}: {exc}") from exc
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
        if created and not any(folder.iterdir()):
            folder.rmdir()
    logger.info("saved %s", folder)
    return folder


def load(folder: str | Path, build: Callable[[], nn.Module]) -> nn.Module:
    """Rebuild a saved model: ``build()`` the base, replay the structure, load weights strictly.

    Args:
        folder: A folder written by ``save``.
        build: Makes the uncompressed base model (the same factory the run started from);
            its weights are overwritten, so it need not be pretrained.

    Returns:
        The compressed model, in eval mode.

    Raises:
        OutputError: The folder or a file is missing, ``structure.json`` is malformed, or
            the weights do not fit the rebuilt model (the message names the first key).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise OutputError(f"cannot load {folder}: no such folder (expected one written by torchslim.save)")
    ops = read_structure(folder / STRUCTURE)
    model = build()
    if not isinstance(model, nn.Module):
        raise ModelError(f"build() must return an nn.Module, found {type(model).__name__}")
    structure.replay(model, ops)
    load_state_dict_into(model, folder / WEIGHTS)
    return model.eval()


def read_structure(path: Path) -> list[dict[str, Any]]:
    """The ops of a ``structure.json``, checked for our format marker and version."""
    if not path.is_file():
        raise OutputError(f"{path} does not exist (expected a folder written by torchslim.save)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OutputError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise OutputError(f"{path}: expected 'format: {FORMAT}', found {found!r}")
    if raw.get("version") != VERSION:
        raise OutputError(
            f"{path}: unsupported version {raw.get('version')!r} (this torchslim reads {VERSION})"
        )
    ops = raw.get("ops")
    if not isinstance(ops, list):
        raise OutputError(f"{path}: 'ops' must be a list, found {type(ops).__name__}")
    return ops


def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a ``structure.json`` or ``record.json`` written by torchslim."""
    try:
        read_structure(folder / STRUCTURE)
        return True
    except OutputError:
        pass
    try:
        raw = json.loads((folder / RECORD).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(raw, dict) and {"recipe", "environment"} <= raw.keys()


def _check_folder(folder: Path, *, overwrite: bool) -> None:
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"cannot save to {folder}: it is a file (expected a folder)")
    if overwrite or not folder.is_dir() or not any(folder.iterdir()) or is_run_folder(folder):
        return
    raise OutputError(
        f"cannot save to {folder}: it is not empty and is not a torchslim run folder (no "
        f"torchslim {STRUCTURE} or {RECORD}); choose another folder or pass --overwrite "
        "(overwrite=True), which replaces only torchslim's files"
    )


def _texts(result: SavedResult) -> dict[str, str]:
    """structure.json, recipe.yaml and record.json as text, in the order they are renamed."""
    record = result.record
    masked = [fqn or "<root>" for fqn, m in result.model.named_modules() if parametrize.is_parametrized(m)]
    if masked:
        raise OutputError(f"cannot save: {masked[0]} still holds masks or other parametrizations; "
                          "call torchslim.core.surgery.finalize(model) first")
    ops = structure.capture(result.model, record.structure)
    try:
        structure_text = json.dumps({"format": FORMAT, "version": VERSION, "ops": ops}, indent=2)
        recipe_text = yaml.safe_dump(record.recipe, sort_keys=False)
    except (TypeError, ValueError, yaml.YAMLError) as exc:
        raise OutputError(f"cannot save: the structure or recipe is not plain data ({exc})") from exc
    return {STRUCTURE: structure_text, RECIPE: recipe_text, RECORD: record.to_json()}


def _make_folder(folder: Path) -> bool:
    """Create ``folder`` if needed; return whether it was created."""
    if folder.is_dir():
        return False
    try:
        folder.mkdir(parents=True)
    except OSError as exc:
        raise OutputError(f"cannot create {folder}: {exc}") from exc
    return True
