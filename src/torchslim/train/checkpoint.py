"""Atomic training checkpoints that load without executing code (``weights_only=True``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from torchslim.core.storage import temp_path

__all__ = ["atomic_torch_save", "latest_checkpoint", "load_checkpoint"]


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write ``obj`` with ``torch.save`` to a temporary file, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        torch.save(obj, tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def latest_checkpoint(folder: Path, prefix: str) -> Path | None:
    """The checkpoint ``<prefix>-<n>.pt`` with the largest ``n`` in ``folder``, or None."""
    if not folder.is_dir():
        return None
    found = []
    for p in folder.glob(f"{prefix}-*.pt"):
        tail = p.stem[len(prefix) + 1:]
        if tail.isdigit():
            found.append((int(tail), p))
    return max(found)[1] if found else None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by ``atomic_torch_save``; never unpickles code."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a torchslim training checkpoint")
    return state
