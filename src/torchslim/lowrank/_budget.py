"""Per-layer ranks under a FLOPs budget, shared by ``lowrank.svd``, ``lowrank.drone`` and ``lowrank.tucker``.

Every layer starts at rank 1 in each of its modes. The allocator then takes, one at a time, the
step with the most retained energy per added multiply-add over all layers: one more component
of one mode, or, where that would cost as much as the dense layer, the dense layer itself (all
its remaining energy). The sequence of steps does not depend on the budget, which only says
where it stops, so a tighter budget never gives any layer a higher rank.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from torchslim.core import Context, HookSet, calibration_inputs, check
from torchslim.core.layerwise import run_batches
from torchslim.errors import ConfigError

__all__ = ["Layer", "allocate", "check_budget", "energy_shares", "positions"]

logger = logging.getLogger(__name__)

Ranks = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Layer:
    """What the allocator knows of one layer.

    Attributes:
        shares: Per mode, the energy share of each component, largest first (each sums to 1).
        cost: Multiply-adds of the factorised layer at the given ranks, one per mode.
        dense: Multiply-adds of the layer as it is.
    """

    shares: tuple[torch.Tensor, ...]
    cost: Callable[[Ranks], int]
    dense: int


def check_budget(name: str, flops: float | None, energy: float | None) -> None:
    """``flops`` is a share in (0, 1) and excludes ``energy``."""
    if flops is None:
        return
    check(0 < flops < 1,
          f"{name}: flops must be a share in (0, 1) of the selected layers' FLOPs; found {flops!r}")
    check(energy is None, f"{name}: set either flops (a FLOPs budget) or energy (a per-layer rule), "
                          f"not both; found flops={flops!r} and energy={energy!r}")


def energy_shares(singular: torch.Tensor) -> torch.Tensor:
    """Squared singular values as shares of their sum (float64, largest first)."""
    squares = singular.detach().double() ** 2
    return squares / squares.sum().clamp_min(1e-300)


@torch.no_grad()
def positions(model: nn.Module, layers: dict[str, nn.Module], ctx: Context,
              name: str) -> dict[str, tuple[int, int]]:
    """``(input, output)`` positions (rows of a Linear, batch x pixels of a conv) of each layer.

    Counted on one forward pass of ``ctx.example_inputs``, else of the first calibration batch.
    """
    batch = ctx.example_inputs
    if batch is None:
        batch = calibration_inputs(ctx, 1, f"{name} (to count each layer's FLOPs for the flops budget; "
                                           "or set ctx.example_inputs)")[0]
    seen: dict[str, tuple[int, int]] = {}

    def count(fqn: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            shape = cast("torch.Tensor", module.weight).shape  # (out, in, ...): a Linear, an ungrouped conv
            width_out, width_in = int(shape[0]), int(shape[1])
            old = seen.get(fqn, (0, 0))
            seen[fqn] = (old[0] + args[0].numel() // width_in, old[1] + out.numel() // width_out)
        return hook

    with HookSet() as hooks:
        for fqn, layer in layers.items():
            hooks.forward(layer, count(fqn))
        run_batches(model, [batch])
    for fqn in layers:
        if fqn not in seen:
            logger.warning("%s: %s did not run on the example inputs, so it has no FLOPs to budget; "
                           "left as it is", name, fqn)
    return seen


def _step(layer: Layer, ranks: Ranks) -> tuple[float, int, Ranks | None] | None:
    """The layer's best next step: (energy per multiply-add, added multiply-adds, new ranks; None: dense)."""
    now = layer.cost(ranks)
    best: tuple[float, int, Ranks | None] | None = None
    for mode, share in enumerate(layer.shares):
        if ranks[mode] >= len(share):
            continue
        grown = ranks[:mode] + (ranks[mode] + 1,) + ranks[mode + 1:]
        cost = layer.cost(grown)
        if cost >= layer.dense:  # the next component costs as much as the dense layer: keep it dense
            gain = sum(float(s[r:].sum()) for s, r in zip(layer.shares, ranks))
            extra = layer.dense - now
            step: tuple[float, int, Ranks | None] = (gain / max(extra, 1), extra, None)
        else:
            step = (float(share[ranks[mode]]) / (cost - now), cost - now, grown)
        if best is None or step[0] > best[0]:
            best = step
    return best


def allocate(layers: dict[str, Layer], flops: float, name: str) -> tuple[dict[str, Ranks | None], float]:
    """Ranks per layer (None: stays dense) within ``flops`` of the layers' dense multiply-adds.

    Returns:
        The ranks and the share of the dense multiply-adds they cost.

    Raises:
        ConfigError: ``flops`` is below the share of rank 1 everywhere.
    """
    state: dict[str, Ranks | None] = {}
    for fqn, layer in layers.items():
        ones = (1,) * len(layer.shares)
        state[fqn] = ones if layer.cost(ones) < layer.dense else None
    cost = {f: layers[f].dense if r is None else layers[f].cost(r) for f, r in state.items()}
    total = sum(layer.dense for layer in layers.values())
    budget = flops * total
    spent = sum(cost.values())
    if spent > budget:
        raise ConfigError(f"{name}: flops {flops!r} is below the smallest share these {len(layers)} layers "
                          f"reach, {spent / total:.4f} (rank 1 everywhere, dense where that saves nothing); "
                          f"expected flops >= {spent / total:.4f}")
    order = list(layers)
    heap: list[tuple[float, int, int, Ranks | None]] = []

    def push(fqn: str) -> None:
        ranks = state[fqn]
        step = None if ranks is None else _step(layers[fqn], ranks)
        if step is not None and step[0] > 0:
            heapq.heappush(heap, (-step[0], order.index(fqn), step[1], step[2]))

    for fqn in order:
        push(fqn)
    while heap:
        _, index, extra, grown = heapq.heappop(heap)
        if spent + extra > budget:
            break  # stop at the first step that does not fit: the same path for every budget
        fqn = order[index]
        spent += extra
        state[fqn] = grown
        push(fqn)
    return state, spent / total if total else 1.0
