"""What ``lowrank.tucker`` and ``lowrank.separable`` share: which convolutions, the FLOPs rule, the swap."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

from torch import nn

from torchslim.core import Outcome, select, surgery
from torchslim.errors import UnsupportedModuleError
from torchslim.lowrank.modules import factorised_parts

__all__ = ["eligible_convs", "swap_convs"]

logger = logging.getLogger(__name__)

# (multiply-adds per output pixel of the replacement, per-layer numbers for the report, its builder)
Plan = tuple[int, dict[str, float], Callable[[], nn.Module]]


def eligible_convs(model: nn.Module, targets: tuple[str, ...], ignore: tuple[str, ...],
                   name: str) -> dict[str, nn.Conv2d]:
    """Selected plain, ungrouped ``nn.Conv2d`` layers with a kernel larger than 1x1.

    Raises:
        UnsupportedModuleError: the model has no such layer among the selected ones.
    """
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        kinds = sorted({type(m).__name__ for m in model.modules()})
        raise UnsupportedModuleError(f"{name}: expected a model with nn.Conv2d layers; found none "
                                     f"(module types: {', '.join(kinds)})")
    parts = factorised_parts(model)
    fresh = [(f, m) for f, m in select(model, targets, ignore) if f not in parts]
    chosen = surgery.plain_layers(model, fresh,
                                  (nn.Conv2d,), name)
    eligible: dict[str, nn.Conv2d] = {}
    skipped = []
    for fqn, conv in chosen.items():
        assert isinstance(conv, nn.Conv2d)
        if conv.groups != 1:
            skipped.append(f"{fqn} (groups={conv.groups})")
        elif math.prod(conv.kernel_size) == 1:
            skipped.append(f"{fqn} (1x1 kernel)")
        else:
            eligible[fqn] = conv
    if skipped:
        logger.info("%s: %d convolution(s) left as they are: %s", name, len(skipped), "; ".join(skipped))
    if not eligible:
        raise UnsupportedModuleError(
            f"{name}: expected at least one selected plain nn.Conv2d with groups=1 and a kernel larger "
            f"than 1x1 (targets {list(targets)}, ignore {list(ignore)}); found none"
            + (f" (skipped: {'; '.join(skipped)})" if skipped else ""))
    return eligible


def dense_cost(conv: nn.Conv2d) -> int:
    """Multiply-adds per output pixel of ``conv``."""
    return conv.in_channels * conv.out_channels * math.prod(conv.kernel_size) // conv.groups


def swap_convs(model: nn.Module, convs: dict[str, nn.Conv2d], name: str,
               plan: Callable[[str, nn.Conv2d], Plan], stats: dict[str, float] | None = None) -> Outcome:
    """Replace each conv by the module ``plan`` builds where it costs fewer multiply-adds."""
    made: dict[str, nn.Module] = {}
    layers: dict[str, dict[str, float]] = {}
    for fqn, conv in convs.items():
        cost, numbers, build = plan(fqn, conv)
        if cost >= dense_cost(conv):
            logger.info("%s: %s: %s would not reduce FLOPs (%d >= %d multiply-adds per output pixel); "
                        "skipped", name, fqn, numbers, cost, dense_cost(conv))
            continue
        made[fqn] = build().train(conv.training)
        layers[fqn] = {**numbers, "macs_ratio": round(cost / dense_cost(conv), 4)}
    replaced = surgery.replace_modules(model, list(convs.items()), lambda fqn, _: made.get(fqn))
    params_before = sum(convs[f].weight.numel() for f in replaced)
    params_after = sum(sum(p.numel() for n, p in made[f].named_parameters() if n.endswith("weight"))
                       for f in replaced)
    ratio = round(params_after / params_before, 4) if params_before else 1.0
    return Outcome(model=model, touched=replaced, structure={f: {} for f in replaced},
                   stats={"layers": len(replaced), "weight_ratio": ratio, **(stats or {})},
                   layers={f: layers[f] for f in replaced})
