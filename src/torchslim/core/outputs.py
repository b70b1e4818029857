"""Finding the main tensor in what a model returns (a tensor, an HF output object, a tuple)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["first_tensor"]


def first_tensor(value: Any) -> torch.Tensor | None:
    """A tensor, ``.logits``, ``.last_hidden_state`` or the first tensor of a tuple; else None."""
    if isinstance(value, torch.Tensor):
        return value
    for name in ("logits", "last_hidden_state"):
        found = getattr(value, name, None)
        if isinstance(found, torch.Tensor):
            return found
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None
