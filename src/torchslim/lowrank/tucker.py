"""Tucker-2 decomposition of Conv2d kernels (HOSVD of the output and input channel modes)."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import nn

from torchslim.core import Context, MethodConfig, Outcome, check, register
from torchslim.lowrank._conv import Plan, eligible_convs, swap_convs
from torchslim.lowrank._factor import rank_of
from torchslim.lowrank.modules import TuckerConv2d

__all__ = ["TuckerConfig", "apply", "tucker_factors"]

_NAME = "lowrank.tucker"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TuckerConfig(MethodConfig):
    """Replace each KxK Conv2d by a 1x1, a smaller KxK and a 1x1 conv from its Tucker-2 decomposition.

    Paper: Kim et al., "Compression of Deep Convolutional Neural Networks for Fast and Low
    Power Mobile Applications", ICLR 2016, https://arxiv.org/abs/1511.06530

    Args:
        rank: Ranks kept per layer: a fraction in (0, 1) of each mode's size (``rank_in`` of
            the input channels, ``rank_out`` of the output channels), or an integer used for
            both (capped at the channel count).
        energy: If set, per layer and per mode the smallest rank keeping this share of the
            squared singular values of the mode's unfolding (overrides ``rank``).
        targets: Layer selectors: an fqn, ``re:<regex>`` or ``type:<ClassName>``.
        ignore: Selectors removed from ``targets``.

    Recipe:
        - method: lowrank.tucker
          rank: 0.5
          ignore: ["stem.0"]

    Notes:
        HOSVD in float64: ``U_out`` and ``U_in`` are the leading left singular vectors of the
        kernel unfolded along its output and input channels, the core is
        ``G = W x_0 U_out^T x_1 U_in^T``. The layer becomes 1x1 ``in -> rank_in`` (``U_in^T``),
        KxK ``rank_in -> rank_out`` (``G``, same stride, padding and dilation) and 1x1
        ``rank_out -> out`` (``U_out``, with the bias); at full ranks it is exact. Only plain
        convolutions with ``groups=1`` and a kernel larger than 1x1 are factorised, and only
        where ``in * rank_in * stride^2 + rank_in * rank_out * K^2 + rank_out * out`` multiply-adds
        per output pixel are fewer than ``in * out * K^2`` (a 1-channel stem never is); others
        are logged and left alone. HOSVD is not the best Tucker approximation (Kim et al. use
        VBMF ranks and fine-tune): the result is a smaller dense model, faster on every engine,
        that usually needs a fine-tuning or ``distillation.logits`` stage to recover accuracy.
    """

    name: ClassVar[str] = _NAME
    rank: float = 0.5
    energy: float | None = None
    targets: tuple[str, ...] = ("type:Conv2d",)
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check(self.rank > 0 and (self.rank < 1 or float(self.rank).is_integer()),
              f"{_NAME}: rank must be a fraction in (0, 1) of each mode's channel count or an integer >= 1; "
              f"found {self.rank!r}")
        if self.energy is not None:
            check(0 < self.energy <= 1, f"{_NAME}: energy must be in (0, 1]; found {self.energy!r}")


def _mode_factor(unfolded: torch.Tensor, rank: float, energy: float | None) -> torch.Tensor:
    """Leading left singular vectors of ``unfolded`` (size, rest): (size, r)."""
    u, s, _ = torch.linalg.svd(unfolded, full_matrices=False)
    r = min(rank_of(rank, unfolded.shape[0], s, energy), s.shape[0])
    factor: torch.Tensor = u[:, :r]
    return factor


def tucker_factors(weight: torch.Tensor, rank: float,
                   energy: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(u_in, core, u_out)`` of the HOSVD of ``weight`` (out, in, kh, kw), in ``weight``'s dtype.

    ``u_in`` is (in, rank_in), ``core`` (rank_out, rank_in, kh, kw), ``u_out`` (out, rank_out);
    ``W ~ einsum("or,rshw,is->oihw", u_out, core, u_in)``.
    """
    w = weight.detach().double()
    n_out, n_in = w.shape[:2]
    u_out = _mode_factor(w.reshape(n_out, -1), rank, energy)
    u_in = _mode_factor(w.transpose(0, 1).reshape(n_in, -1), rank, energy)
    core = torch.einsum("oihw,or,is->rshw", w, u_out, u_in)
    return u_in.to(weight.dtype), core.to(weight.dtype), u_out.to(weight.dtype)


@register(TuckerConfig)
def apply(model: nn.Module, cfg: TuckerConfig, ctx: Context) -> Outcome:
    """Factorise every selected plain KxK ``nn.Conv2d`` whose Tucker-2 form saves FLOPs."""
    convs = eligible_convs(model, cfg.targets, cfg.ignore, _NAME)

    def plan(fqn: str, conv: nn.Conv2d) -> Plan:
        u_in, core, u_out = tucker_factors(conv.weight, cfg.rank, cfg.energy)
        r_in, r_out = u_in.shape[1], u_out.shape[1]
        cost = (conv.in_channels * r_in * math.prod(conv.stride) + r_in * r_out * math.prod(conv.kernel_size)
                + r_out * conv.out_channels)
        numbers: dict[str, float] = {"rank_in": r_in, "rank_out": r_out}
        return cost, numbers, lambda: TuckerConv2d.from_factors(conv, u_in, core, u_out)

    return swap_convs(model, convs, _NAME, plan)
