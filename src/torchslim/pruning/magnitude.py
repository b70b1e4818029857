"""Unstructured magnitude pruning (Han et al. 2015, https://arxiv.org/abs/1506.02626)."""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar, Literal

import torch
from torch import nn

from torchslim.core import Context, MethodConfig, Outcome, check, register, select, surgery

__all__ = ["MagnitudePruningConfig", "apply", "magnitude_mask"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MagnitudePruningConfig(MethodConfig):
    """Zero the smallest-magnitude weights, per layer or ranked across all selected layers.

    Paper: Han et al., "Learning both Weights and Connections for Efficient Neural
    Networks", NeurIPS 2015, https://arxiv.org/abs/1506.02626

    Args:
        sparsity: Fraction of the selected weights set to zero, in [0, 1).
        scope: ``layer`` prunes each layer to ``sparsity``; ``global`` ranks all selected
            weights together, so layers with many small weights lose more.
        targets: Layer selectors: an fqn, ``re:<regex>`` or ``type:<ClassName>``.
        ignore: Selectors removed from ``targets``.

    Recipe:
        - method: pruning.magnitude
          sparsity: 0.5
          scope: global
          ignore: ["re:.*classifier.*"]

    Notes:
        Masks stay as parametrizations until the stage ends, so a ``train`` block in the
        same stage fine-tunes with the zeros held in place. The saved file stores the
        zeros compactly; dense kernels run no faster (no sparse kernel is used).
    """

    name: ClassVar[str] = "pruning.magnitude"
    sparsity: float = 0.5
    scope: Literal["layer", "global"] = "layer"
    targets: tuple[str, ...] = ("type:Linear", "type:Conv2d", "type:Conv1d")
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check(0.0 <= self.sparsity < 1.0, f"sparsity must be in [0, 1), got {self.sparsity}")


@register(MagnitudePruningConfig)
def apply(model: nn.Module, cfg: MagnitudePruningConfig, ctx: Context) -> Outcome:
    """Add magnitude masks to every selected layer's weight."""
    tied = {name for group in surgery.shared_parameters(model) for name in group}
    weights: dict[str, torch.Tensor] = {}
    for fqn, m in select(model, cfg.targets, cfg.ignore):
        weight = getattr(m, "weight", None)
        if f"{fqn}.weight" in tied:
            logger.warning("pruning.magnitude: skipping %s, its weight is tied to another layer", fqn)
        elif isinstance(weight, torch.Tensor):
            weights[fqn] = weight.detach()
    cutoff = _global_cutoff(list(weights.values()), cfg.sparsity) if cfg.scope == "global" else None
    per_layer: dict[str, dict[str, float]] = {}
    for fqn, weight in weights.items():
        mask = magnitude_mask(weight, cfg.sparsity) if cutoff is None else weight.abs() > cutoff
        surgery.add_mask(model.get_submodule(fqn), "weight", mask)
        per_layer[fqn] = {"sparsity": 1.0 - float(mask.float().mean())}
    total = sum(w.numel() for w in weights.values())
    zeros = sum(per_layer[f]["sparsity"] * w.numel() for f, w in weights.items())
    return Outcome(model=model, touched=tuple(per_layer), layers=per_layer,
                   stats={"sparsity": zeros / max(total, 1)})


@torch.no_grad()
def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean mask keeping the largest ``1 - sparsity`` share of ``|weight|``."""
    n_zero = int(weight.numel() * sparsity)
    if n_zero == 0:
        return torch.ones_like(weight, dtype=torch.bool)
    # Rank by position so ties at the cutoff still give exactly n_zero zeros.
    order = weight.abs().flatten().argsort(stable=True)
    mask = torch.ones(weight.numel(), dtype=torch.bool, device=weight.device)
    mask[order[:n_zero]] = False
    return mask.view_as(weight)


@torch.no_grad()
def _global_cutoff(weights: list[torch.Tensor], sparsity: float) -> float:
    magnitudes = torch.cat([w.detach().abs().flatten() for w in weights])
    n_zero = int(magnitudes.numel() * sparsity)
    if n_zero == 0:
        return -1.0
    return float(magnitudes.kthvalue(n_zero).values)
