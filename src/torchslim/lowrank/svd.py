"""Truncated-SVD factorisation of Linear layers."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from torchslim.core import Context, MethodConfig, Outcome, register
from torchslim.lowrank._factor import check_rank, factorisable, factorise, rank_of

__all__ = ["SVDConfig", "apply", "svd_factors"]

_NAME = "lowrank.svd"


@dataclasses.dataclass(frozen=True, kw_only=True)
class SVDConfig(MethodConfig):
    """Replace each Linear by two thinner ones from its truncated singular value decomposition.

    Paper: Denton et al., "Exploiting Linear Structure Within Convolutional Networks for
    Efficient Evaluation", NeurIPS 2014, https://arxiv.org/abs/1404.0736

    Args:
        rank: Rank kept per layer: a fraction in (0, 1) of ``min(in, out)``, or an integer.
        energy: If set, the smallest rank keeping this share of the squared singular values,
            per layer (overrides ``rank``).
        targets: Layer selectors: an fqn, ``re:<regex>`` or ``type:<ClassName>``.
        ignore: Selectors removed from ``targets``.

    Recipe:
        - method: lowrank.svd
          rank: 0.25
          ignore: ["re:.*classifier.*"]

    Notes:
        ``W ~ (U_r sqrt(S_r)) (sqrt(S_r) V_r^T)``: the best rank-r approximation of the weight
        alone (Eckart-Young), blind to which input directions matter; ``lowrank.drone``
        weighs them by calibration activations and is more accurate at the same rank. A
        layer is factorised only where ``rank * (in + out) < in * out`` (fewer FLOPs and
        weights); a rank at or above ``min(in, out)`` is skipped with a warning. The result
        is a smaller dense model that runs faster on every engine; recover accuracy with a
        ``distillation.logits`` stage from the original.
    """

    name: ClassVar[str] = _NAME
    rank: float = 0.25
    energy: float | None = None
    targets: tuple[str, ...] = ("type:Linear",)
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_rank(_NAME, self.rank, self.energy)


def svd_factors(weight: torch.Tensor, rank: float,
                energy: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first, second)`` with ``second @ first`` the truncated SVD of ``weight`` (out, in)."""
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    r = rank_of(rank, min(weight.shape), s, energy)
    root = s[:r].sqrt()
    return (root[:, None] * vh[:r]).float(), (u[:, :r] * root).float()


@register(SVDConfig)
def apply(model: nn.Module, cfg: SVDConfig, ctx: Context) -> Outcome:
    """Factorise every selected plain ``nn.Linear`` whose factorisation saves FLOPs."""
    layers = factorisable(model, cfg.targets, cfg.ignore, _NAME)
    return factorise(model, layers, _NAME, lambda fqn, layer: svd_factors(layer.weight, cfg.rank, cfg.energy))
