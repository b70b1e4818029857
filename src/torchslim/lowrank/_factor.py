"""What ``lowrank.svd`` and ``lowrank.drone`` share: layer choice, rank rules and the swap."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import cast

import torch
from torch import nn

from torchslim.core import Outcome, check, select, surgery
from torchslim.lowrank.modules import LowRankLinear

__all__ = ["check_rank", "factorisable", "factorise", "rank_of"]

logger = logging.getLogger(__name__)


def check_rank(name: str, rank: float, energy: float | None = None) -> None:
    """``rank`` is a fraction in (0, 1) of the full rank, or an integer rank >= 1."""
    check(rank > 0 and (rank < 1 or float(rank).is_integer()),
          f"{name}: rank must be a fraction in (0, 1) of min(in, out) or an integer >= 1; found {rank!r}")
    if energy is not None:
        check(0 < energy <= 1, f"{name}: energy must be in (0, 1]; found {energy!r}")


def rank_of(rank: float, full: int, singular: torch.Tensor | None = None, energy: float | None = None) -> int:
    """The rank to keep: by retained ``energy`` of ``singular`` values if given, else by ``rank``."""
    if energy is not None and singular is not None:
        share = torch.cumsum(singular.double() ** 2, 0) / (singular.double() ** 2).sum().clamp_min(1e-30)
        return int(torch.searchsorted(share, torch.tensor(energy - 1e-12, dtype=share.dtype)).item()) + 1
    return max(1, round(rank * full)) if rank < 1 else int(rank)


def factorisable(model: nn.Module, targets: tuple[str, ...], ignore: tuple[str, ...],
                 name: str) -> dict[str, nn.Linear]:
    """Selected plain ``nn.Linear`` layers; others are skipped with a logged warning."""
    chosen = surgery.plain_layers(model, select(model, targets, ignore), (nn.Linear,), name)
    return cast("dict[str, nn.Linear]", chosen)


def factorise(model: nn.Module, layers: dict[str, nn.Linear], name: str,
              factors: Callable[[str, nn.Linear], tuple[torch.Tensor, torch.Tensor] | None]) -> Outcome:
    """Swap each layer for the ``LowRankLinear`` of ``factors(fqn, layer)`` (None keeps it)."""
    made: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for fqn, layer in layers.items():
        pair = factors(fqn, layer)
        if pair is None:
            continue
        rank, (n_out, n_in) = pair[0].shape[0], layer.weight.shape
        if rank >= min(n_in, n_out):
            logger.warning("%s: %s: rank %d >= min(in, out) = %d, nothing to gain; skipped",
                           name, fqn, rank, min(n_in, n_out))
        elif rank * (n_in + n_out) >= n_in * n_out:
            logger.info("%s: %s: rank %d would not reduce FLOPs (%d >= %d); skipped",
                        name, fqn, rank, rank * (n_in + n_out), n_in * n_out)
        else:
            made[fqn] = pair

    def build(fqn: str, module: nn.Module) -> nn.Module | None:
        if fqn not in made:
            return None
        assert isinstance(module, nn.Linear)
        first, second = made[fqn]
        bias = None if module.bias is None else module.bias.detach()
        new = LowRankLinear.from_factors(first.to(module.weight.dtype), second.to(module.weight.dtype), bias)
        return new.to(module.weight.device).train(module.training)

    replaced = surgery.replace_modules(model, list(layers.items()), build)
    before = sum(math.prod(layers[f].weight.shape) for f in replaced)
    after = sum(made[f][0].numel() + made[f][1].numel() for f in replaced)
    ratio = round(after / before, 4) if before else 1.0
    return Outcome(model=model, touched=replaced, structure={f: {} for f in replaced},
                   stats={"layers": len(replaced), "weight_ratio": ratio},
                   layers={f: {"rank": int(made[f][0].shape[0])} for f in replaced})
