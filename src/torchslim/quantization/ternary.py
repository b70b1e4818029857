"""Ternary weights (TWN): ``alpha * t`` with ``t`` in {-1, 0, +1}, trained straight-through."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from torchslim.core import MethodConfig, check, register
from torchslim.quantization._lowbit_train import LowBitMethod, check_flags
from torchslim.quantization.lowbit import TernaryConv2d, TernaryLinear, ternarize, ternary_codes

__all__ = ["TernaryQuantization", "TernaryQuantizationConfig"]

_NAME = "quantization.ternary"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TernaryQuantizationConfig(MethodConfig):
    """Ternarise weights: zero below a threshold, ``+-alpha`` above it.

    Paper: Li, Zhang & Liu, "Ternary Weight Networks", 2016, https://arxiv.org/abs/1605.04711

    Args:
        threshold_factor: ``delta = threshold_factor * mean |W|``; weights with ``|W| <= delta``
            become 0 (the paper's approximation of the optimal threshold: 0.7).
        per_channel: One ``delta`` and ``alpha`` per output channel; False uses one for the
            whole tensor, as in the paper.
        keep_first_last: Keep the model's first and last Linear / Conv layers (in registration
            order) in float.
        targets: Layer selectors: an fqn, ``re:<regex>`` or ``type:<ClassName>``.
        ignore: Selectors removed from ``targets``.

    Recipe:
        - method: quantization.ternary
          threshold_factor: 0.7
          per_channel: true

    Lifecycle:
        on_start: wrap each chosen layer; every forward uses ``alpha * t`` computed from the
            float weights (``alpha`` = mean ``|W|`` over the weights above ``delta``). The
            gradient of the ternary weight updates the float weight unchanged (STE).
        on_end: replace each layer by a ``TernaryLinear`` / ``TernaryConv2d`` storing 2 bits
            per weight (4 per byte) plus one float32 scale per output channel.

    Notes:
        Needs a ``train`` block. The saved weights of a ternarised layer are about 16x smaller
        than float32; the packed layers decode and multiply in float (smaller, not faster).
        Tied weights and Linear subclasses read by their owners stay float.
    """

    name: ClassVar[str] = _NAME
    threshold_factor: float = 0.7
    per_channel: bool = True
    keep_first_last: bool = True
    targets: tuple[str, ...] = ("type:Linear", "type:Conv2d")
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check(isinstance(self.threshold_factor, (int, float)) and 0.0 <= self.threshold_factor < 2.0,
              f"{_NAME}: threshold_factor must be a number in [0, 2) (the paper: 0.7); "
              f"found {self.threshold_factor!r}")
        check_flags(_NAME, self, ("per_channel", "keep_first_last"))


@register(TernaryQuantizationConfig)
class TernaryQuantization(LowBitMethod):
    """TWN ternarisation during training, packed 2-bit layers at the end."""

    cfg: TernaryQuantizationConfig
    who = _NAME
    packed = (TernaryLinear, TernaryConv2d)
    bits = 2

    def quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """``alpha * t`` with the identity straight-through gradient."""
        return ternarize(weight, self.cfg.threshold_factor, self.cfg.per_channel)

    def codes(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Ternary signs and per-row scales (equal rows when not ``per_channel``)."""
        return ternary_codes(weight, self.cfg.threshold_factor, self.cfg.per_channel)
