"""What ``lowrank.svd`` and ``lowrank.drone`` share: layer choice, rank rules, FLOPs budget, the swap."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import cast

import torch
from torch import nn

from torchslim.core import Context, Outcome, check, select, surgery
from torchslim.lowrank._budget import Layer, allocate, energy_shares, positions
from torchslim.lowrank.modules import LowRankConv2d, LowRankLinear, factorised_parts

__all__ = ["budget_ranks", "check_rank", "factorisable", "factorise", "matrix", "rank_of"]

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


def matrix(layer: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a Linear or of a 1x1 Conv2d."""
    weight = cast("torch.Tensor", layer.weight)
    return weight[:, :, 0, 0] if weight.dim() == 4 else weight


def factorisable(model: nn.Module, targets: tuple[str, ...], ignore: tuple[str, ...],
                 name: str) -> dict[str, nn.Module]:
    """Selected plain ``nn.Linear`` and unpadded 1x1 ``nn.Conv2d`` with ``groups=1``; others are logged."""
    parts = factorised_parts(model)
    fresh = [(f, m) for f, m in select(model, targets, ignore) if f not in parts]
    chosen = surgery.plain_layers(model, fresh,
                                  (nn.Linear, nn.Conv2d), name)
    kept = {f: m for f, m in chosen.items() if isinstance(m, nn.Linear) or (
        cast("nn.Conv2d", m).kernel_size == (1, 1) and cast("nn.Conv2d", m).groups == 1
        and cast("nn.Conv2d", m).padding in ((0, 0), "valid", "same"))}
    if len(kept) < len(chosen):
        logger.info("%s: convolution(s) other than unpadded 1x1 with groups=1 left as they are: %s",
                    name, ", ".join(sorted(set(chosen) - set(kept))))
    return kept


def budget_ranks(model: nn.Module, layers: dict[str, nn.Module], ctx: Context, flops: float, name: str,
                 spectrum: Callable[[str, nn.Module], torch.Tensor | None],
                 ) -> tuple[dict[str, int | None], float]:
    """Ranks (None: stays dense) of ``layers`` jointly within ``flops`` of their FLOPs.

    ``spectrum(fqn, layer)`` gives the singular values ranked by the allocator (None: left out).
    Returns the ranks and the share of the layers' FLOPs that they cost.
    """
    rows = positions(model, layers, ctx, name)
    budget: dict[str, Layer] = {}
    for fqn, layer in layers.items():
        singular = spectrum(fqn, layer) if fqn in rows else None
        if singular is None:
            continue
        n_out, n_in = matrix(layer).shape
        count = rows[fqn][1]

        def cost(r: tuple[int, ...], count: int = count, width: int = n_in + n_out) -> int:
            return count * r[0] * width

        budget[fqn] = Layer(shares=(energy_shares(singular),), dense=count * n_in * n_out, cost=cost)
    ranks, share = allocate(budget, flops, name)
    return {f: None if r is None else r[0] for f, r in ranks.items()}, round(share, 4)


def factorise(model: nn.Module, layers: dict[str, nn.Module], name: str,
              factors: Callable[[str, nn.Module], tuple[torch.Tensor, torch.Tensor] | None],
              stats: dict[str, float] | None = None) -> Outcome:
    """Swap each layer for the low-rank pair ``factors(fqn, layer)`` gives (None keeps it)."""
    made: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for fqn, layer in layers.items():
        pair = factors(fqn, layer)
        if pair is None:
            continue
        rank, (n_out, n_in) = pair[0].shape[0], matrix(layer).shape
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
        dtype = cast("torch.Tensor", module.weight).dtype
        first, second = (t.to(dtype) for t in made[fqn])
        if isinstance(module, nn.Conv2d):
            return LowRankConv2d.from_factors(module, first, second)
        assert isinstance(module, nn.Linear)
        bias = None if module.bias is None else module.bias.detach()
        new = LowRankLinear.from_factors(first, second, bias)
        return new.to(module.weight.device).train(module.training)

    replaced = surgery.replace_modules(model, list(layers.items()), build)
    before = sum(math.prod(matrix(layers[f]).shape) for f in replaced)
    after = sum(made[f][0].numel() + made[f][1].numel() for f in replaced)
    ratio = round(after / before, 4) if before else 1.0
    return Outcome(model=model, touched=replaced, structure={f: {} for f in replaced},
                   stats={"layers": len(replaced), "weight_ratio": ratio, **(stats or {})},
                   layers={f: {"rank": int(made[f][0].shape[0])} for f in replaced})
