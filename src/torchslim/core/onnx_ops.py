"""Registry of ONNX translations for torchslim's custom torch ops.

Quantized modules that call custom ops register how each op is written in ONNX; the dynamo
exporter receives the table as ``custom_translation_table``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["register_translation", "translation_table"]

_TRANSLATIONS: dict[Any, Callable[..., Any]] = {}


def register_translation(op: Any, fn: Callable[..., Any]) -> None:
    """Translate the torch op ``op`` (e.g. ``torch.ops.torchslim.x.default``) with ``fn``."""
    _TRANSLATIONS[op] = fn


def translation_table() -> dict[Any, Callable[..., Any]]:
    """A copy of every registered translation."""
    return dict(_TRANSLATIONS)
