"""Truncated-SVD factorisation of Linear (and 1x1 Conv2d) layers, by rank, energy or a FLOPs budget."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from torchslim.core import Context, MethodConfig, Outcome, register
from torchslim.lowrank._budget import check_budget
from torchslim.lowrank._factor import budget_ranks, check_rank, factorisable, factorise, matrix, rank_of

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
        flops: If set, a budget: the share in (0, 1) of the selected layers' FLOPs to keep,
            with ranks chosen per layer jointly (overrides ``rank``; excludes ``energy``).
        targets: Layer selectors: an fqn, ``re:<regex>`` or ``type:<ClassName>``. Linear
            layers and unpadded 1x1 Conv2d with ``groups=1`` (``type:Conv2d``) qualify.
        ignore: Selectors removed from ``targets``.

    Recipe:
        - method: lowrank.svd
          rank: 0.25
          ignore: ["re:.*classifier.*"]
        # or: half the FLOPs of every Linear and 1x1 conv, ranks chosen per layer
        - method: lowrank.svd
          flops: 0.5
          targets: ["type:Linear", "type:Conv2d"]

    Notes:
        ``W ~ (U_r sqrt(S_r)) (sqrt(S_r) V_r^T)``: the best rank-r approximation of the weight
        alone (Eckart-Young), blind to which input directions matter; ``lowrank.drone``
        weighs them by calibration activations and is more accurate at the same rank. A
        layer is factorised only where ``rank * (in + out) < in * out`` (fewer FLOPs and
        weights); a rank at or above ``min(in, out)`` is skipped with a warning. The result
        is a smaller dense model that runs faster on every engine; recover accuracy with a
        ``distillation.logits`` stage from the original.

        With ``flops``, every layer starts at rank 1 and the allocator repeatedly takes the
        singular component, over all layers, with the largest share of its layer's squared
        singular values per multiply-add it adds (a layer's multiply-adds are counted on
        ``ctx.example_inputs``, else on the first calibration batch, so layers that run on
        more rows or pixels cost more), until the next one would exceed the budget; a layer
        whose next component would cost as much as the dense layer becomes dense again if
        that fits. The budget is on FLOPs only: there is no latency model in
        ``torchslim.core`` to budget against, so measure the latency of the result. Chosen
        ranks are in the outcome's ``layers``, the share of FLOPs reached in its stats
        (``flops_share``).
    """

    name: ClassVar[str] = _NAME
    rank: float = 0.25
    energy: float | None = None
    flops: float | None = None
    targets: tuple[str, ...] = ("type:Linear",)
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_rank(_NAME, self.rank, self.energy)
        check_budget(_NAME, self.flops, self.energy)


def svd_factors(weight: torch.Tensor, rank: float,
                energy: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first, second)`` with ``second @ first`` the truncated SVD of ``weight`` (out, in)."""
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    r = rank_of(rank, min(weight.shape), s, energy)
    root = s[:r].sqrt()
    return (root[:, None] * vh[:r]).float(), (u[:, :r] * root).float()


@register(SVDConfig)
def apply(model: nn.Module, cfg: SVDConfig, ctx: Context) -> Outcome:
    """Factorise every selected plain ``nn.Linear`` (or 1x1 conv) whose factorisation saves FLOPs."""
    layers = factorisable(model, cfg.targets, cfg.ignore, _NAME)
    if cfg.flops is None:
        return factorise(model, layers, _NAME,
                         lambda fqn, layer: svd_factors(matrix(layer), cfg.rank, cfg.energy))
    ranks, share = budget_ranks(model, layers, ctx, cfg.flops, _NAME,
                                lambda fqn, layer: torch.linalg.svdvals(matrix(layer).detach().double()))

    def factors(fqn: str, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
        rank = ranks.get(fqn)
        return None if rank is None else svd_factors(matrix(layer), rank)

    return factorise(model, layers, _NAME, factors, {"flops_share": share})
