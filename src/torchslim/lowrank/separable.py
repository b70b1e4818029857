"""A standard KxK Conv2d replaced by depthwise KxK + pointwise 1x1, from per-channel SVDs."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import nn

from torchslim.core import Context, MethodConfig, Outcome, check, register
from torchslim.lowrank._conv import Plan, eligible_convs, swap_convs
from torchslim.lowrank.modules import SeparableConv2d

__all__ = ["SeparableConfig", "apply", "separable_factors"]

_NAME = "lowrank.separable"


@dataclasses.dataclass(frozen=True, kw_only=True)
class SeparableConfig(MethodConfig):
    """Replace each KxK Conv2d by a depthwise KxK conv and a pointwise 1x1 conv (MobileNet style).

    Paper: Howard et al., "MobileNets: Efficient Convolutional Neural Networks for Mobile
    Vision Applications", 2017, https://arxiv.org/abs/1704.04861 (the layer); initialised
    from per-channel low-rank approximations as in Jaderberg et al., "Speeding up
    Convolutional Neural Networks with Low Rank Expansions", BMVC 2014.

    Args:
        depth_multiplier: Depthwise filters per input channel (``m``); the depthwise conv
            maps ``in -> in * m`` channels.
        targets: Layer selectors: an fqn, ``re:<regex>`` or ``type:<ClassName>``.
        ignore: Selectors removed from ``targets``.

    Recipe:
        # fine-tune afterwards: give this stage a `train: {epochs: 1}` block
        # (or add distillation.logits to it); train is a stage key, not a method field
        - method: lowrank.separable
          depth_multiplier: 1
          ignore: ["stem.0"]

    Notes:
        For each input channel ``c`` the ``(out, K*K)`` slice ``W[:, c]`` is replaced by its
        best rank-``m`` approximation ``U_m S_m V_m^T`` (SVD): the ``m`` depthwise filters of
        channel ``c`` are the rows of ``V_m^T``, the pointwise weights ``U_m S_m``. It is exact
        when ``m >= min(out, K*K)`` and otherwise the closest kernel of this form channel by
        channel (Eckart-Young), but a standard conv is rarely near it: at ``m = 1`` this
        initialisation loses accuracy, often most of it. It is meant to be followed by
        training in the same or the next stage: a ``train`` block fine-tunes, and
        ``distillation.logits`` in it distils from the original as teacher. Only plain
        convolutions with ``groups=1`` and a kernel larger than 1x1 are replaced, and only
        where ``in * m * (K^2 + out)`` multiply-adds per output pixel are fewer than
        ``in * out * K^2``; others are logged and left alone. The result is a smaller dense
        model; depthwise kernels are memory-bound, so measure the speed-up on the target.
    """

    name: ClassVar[str] = _NAME
    depth_multiplier: int = 1
    targets: tuple[str, ...] = ("type:Conv2d",)
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check(isinstance(self.depth_multiplier, int) and not isinstance(self.depth_multiplier, bool)
              and self.depth_multiplier >= 1,
              f"{_NAME}: depth_multiplier must be an integer >= 1; found {self.depth_multiplier!r}")


def separable_factors(weight: torch.Tensor, multiplier: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(depthwise, pointwise)``: (in * m, 1, kh, kw) and (out, in * m), in ``weight``'s dtype.

    Depthwise filter ``c * m + j`` is the j-th right singular vector of ``W[:, c]`` (out, kh*kw);
    pointwise column ``c * m + j`` is the j-th left singular vector times its singular value.
    Slots beyond ``min(out, kh*kw)`` are zero.
    """
    n_out, n_in, kh, kw = weight.shape
    slices = weight.detach().double().permute(1, 0, 2, 3).reshape(n_in, n_out, kh * kw)
    u, s, vh = torch.linalg.svd(slices, full_matrices=False)  # (in, out, k), (in, k), (in, k, kh*kw)
    k = min(multiplier, s.shape[1])
    depthwise = torch.zeros(n_in, multiplier, kh * kw, dtype=torch.float64)
    pointwise = torch.zeros(n_out, n_in, multiplier, dtype=torch.float64)
    depthwise[:, :k] = vh[:, :k]
    pointwise[:, :, :k] = (u[:, :, :k] * s[:, None, :k]).permute(1, 0, 2)
    return (depthwise.reshape(n_in * multiplier, 1, kh, kw).to(weight.dtype),
            pointwise.reshape(n_out, n_in * multiplier).to(weight.dtype))


@register(SeparableConfig)
def apply(model: nn.Module, cfg: SeparableConfig, ctx: Context) -> Outcome:
    """Replace every selected plain KxK ``nn.Conv2d`` whose separable form saves FLOPs."""
    convs = eligible_convs(model, cfg.targets, cfg.ignore, _NAME)
    m = cfg.depth_multiplier

    def plan(fqn: str, conv: nn.Conv2d) -> Plan:
        cost = conv.in_channels * m * (math.prod(conv.kernel_size) + conv.out_channels)
        return cost, {"depth_multiplier": m}, lambda: SeparableConv2d.from_factors(
            conv, *separable_factors(conv.weight, m))

    return swap_convs(model, convs, _NAME, plan)
