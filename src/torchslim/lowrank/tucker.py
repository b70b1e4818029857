"""Tucker-2 decomposition of Conv2d kernels (HOSVD of the output and input channel modes)."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import nn

from torchslim.core import Context, MethodConfig, Outcome, check, register
from torchslim.lowrank._budget import Layer, allocate, check_budget, energy_shares, positions
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
        flops: If set, a budget: the share in (0, 1) of the selected convolutions' FLOPs to
            keep, with both ranks of every layer chosen jointly (overrides ``rank``;
            excludes ``energy``).
        targets: Layer selectors: an fqn, ``re:<regex>`` or ``type:<ClassName>``.
        ignore: Selectors removed from ``targets``.

    Recipe:
        - method: lowrank.tucker
          rank: 0.5
          ignore: ["stem.0"]
        # or: half the FLOPs of the KxK convs, ranks chosen per layer and mode
        - method: lowrank.tucker
          flops: 0.5

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

        With ``flops``, every layer starts at ranks (1, 1) and the allocator shared with
        ``lowrank.svd`` repeatedly adds the input- or output-mode component, over all layers,
        with the largest share of squared singular values of its mode's unfolding per
        multiply-add it adds (the HOSVD error is at most the sum of the energy the two modes
        drop); multiply-adds are counted at each layer's real input and output sizes on
        ``ctx.example_inputs`` (else the first calibration batch). A layer whose next step
        would cost as much as the dense conv becomes dense again if that fits. FLOPs only, no
        latency budget (``torchslim.core`` has no latency model); ranks in the outcome's
        ``layers``, the share reached in its stats (``flops_share``).
    """

    name: ClassVar[str] = _NAME
    rank: float = 0.5
    energy: float | None = None
    flops: float | None = None
    targets: tuple[str, ...] = ("type:Conv2d",)
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check(self.rank > 0 and (self.rank < 1 or float(self.rank).is_integer()),
              f"{_NAME}: rank must be a fraction in (0, 1) of each mode's channel count or an integer >= 1; "
              f"found {self.rank!r}")
        if self.energy is not None:
            check(0 < self.energy <= 1, f"{_NAME}: energy must be in (0, 1]; found {self.energy!r}")
        check_budget(_NAME, self.flops, self.energy)


def _mode_factor(unfolded: torch.Tensor, rank: float, energy: float | None) -> torch.Tensor:
    """Leading left singular vectors of ``unfolded`` (size, rest): (size, r)."""
    u, s, _ = torch.linalg.svd(unfolded, full_matrices=False)
    r = min(rank_of(rank, unfolded.shape[0], s, energy), s.shape[0])
    factor: torch.Tensor = u[:, :r]
    return factor


def _unfoldings(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel (float64) unfolded along its input and its output channels."""
    w = weight.detach().double()
    return w.transpose(0, 1).reshape(w.shape[1], -1), w.reshape(w.shape[0], -1)


def tucker_factors(weight: torch.Tensor, rank: float | tuple[int, int],
                   energy: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(u_in, core, u_out)`` of the HOSVD of ``weight`` (out, in, kh, kw), in ``weight``'s dtype.

    ``rank`` is one rule for both modes or the integer pair ``(rank_in, rank_out)``. ``u_in``
    is (in, rank_in), ``core`` (rank_out, rank_in, kh, kw), ``u_out`` (out, rank_out);
    ``W ~ einsum("or,rshw,is->oihw", u_out, core, u_in)``.
    """
    w = weight.detach().double()
    rank_in, rank_out = rank if isinstance(rank, tuple) else (rank, rank)
    unfold_in, unfold_out = _unfoldings(w)
    u_out = _mode_factor(unfold_out, rank_out, energy)
    u_in = _mode_factor(unfold_in, rank_in, energy)
    core = torch.einsum("oihw,or,is->rshw", w, u_out, u_in)
    return u_in.to(weight.dtype), core.to(weight.dtype), u_out.to(weight.dtype)


@register(TuckerConfig)
def apply(model: nn.Module, cfg: TuckerConfig, ctx: Context) -> Outcome:
    """Factorise every selected plain KxK ``nn.Conv2d`` whose Tucker-2 form saves FLOPs."""
    convs = eligible_convs(model, cfg.targets, cfg.ignore, _NAME)
    ranks: dict[str, tuple[int, ...] | None] = {}
    stats: dict[str, float] = {}
    if cfg.flops is not None:
        ranks, stats["flops_share"] = _budget(model, convs, ctx, cfg.flops)
        convs = {f: c for f, c in convs.items() if ranks.get(f) is not None}

    def plan(fqn: str, conv: nn.Conv2d) -> Plan:
        chosen = ranks.get(fqn)
        rule = cfg.rank if chosen is None else (chosen[0], chosen[1])
        u_in, core, u_out = tucker_factors(conv.weight, rule, cfg.energy)
        r_in, r_out = u_in.shape[1], u_out.shape[1]
        cost = (conv.in_channels * r_in * math.prod(conv.stride) + r_in * r_out * math.prod(conv.kernel_size)
                + r_out * conv.out_channels)
        numbers: dict[str, float] = {"rank_in": r_in, "rank_out": r_out}
        return cost, numbers, lambda: TuckerConv2d.from_factors(conv, u_in, core, u_out)

    return swap_convs(model, convs, _NAME, plan, stats)


def _budget(model: nn.Module, convs: dict[str, nn.Conv2d], ctx: Context,
            flops: float) -> tuple[dict[str, tuple[int, ...] | None], float]:
    """Ranks ``(rank_in, rank_out)`` per conv (None: stays dense) and the FLOPs share they reach."""
    sizes = positions(model, dict(convs), ctx, _NAME)
    layers: dict[str, Layer] = {}
    for fqn, conv in convs.items():
        if fqn not in sizes:
            continue
        (pixels_in, pixels_out), k = sizes[fqn], math.prod(conv.kernel_size)
        n_in, n_out = conv.in_channels, conv.out_channels

        def cost(r: tuple[int, ...], p_in: int = pixels_in, p_out: int = pixels_out, n_in: int = n_in,
                 n_out: int = n_out, k: int = k) -> int:
            return p_in * n_in * r[0] + p_out * (r[0] * r[1] * k + r[1] * n_out)

        shares = tuple(energy_shares(torch.linalg.svdvals(u)) for u in _unfoldings(conv.weight))
        layers[fqn] = Layer(shares=shares, cost=cost, dense=pixels_out * n_in * n_out * k)
    ranks, share = allocate(layers, flops, _NAME)
    return ranks, round(share, 4)
