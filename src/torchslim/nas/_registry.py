"""Other techniques, reached by registry key only: nas never imports a technique package."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from torchslim.core import Context, Outcome, config_from_dict, resolve

__all__ = ["apply_by_key", "merge_structure"]


def apply_by_key(model: nn.Module, raw: Mapping[str, Any], ctx: Context, where: str) -> Outcome:
    """Run the one-shot method that ``raw["method"]`` names on ``model`` with ``raw``'s fields."""
    cfg = config_from_dict(raw, f"{where}.method")
    outcome: Outcome = resolve(cfg)(model, cfg, ctx)
    return outcome


def merge_structure(into: dict[str, dict[str, Any]], change: Mapping[str, Mapping[str, Any]]) -> None:
    """Fold one outcome's structure changes into ``into`` (lists of names are united, in order)."""
    for key, fields in change.items():
        merged = dict(into.get(key, {}))
        for field, value in fields.items():
            old = merged.get(field)
            merged[field] = ([*old, *(v for v in value if v not in old)]
                             if isinstance(old, list) and isinstance(value, list) else value)
        into[key] = merged
