"""Shared pieces of the calibrated one-shot LLM pruners (Wanda, SparseGPT).

Pure tensor functions (Wanda scores, exact per-row masks, OWL's outlier ratios and per-block
sparsities) and the plumbing both methods repeat: the sparsity pattern, which layers to prune,
the calibration batches, the OWL allocation pass and the outcome.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn

from torchslim.core import Outcome
from torchslim.core.layerwise import BlockStep, InputNorms, layerwise
from torchslim.errors import ConfigError, UnsupportedModuleError
from torchslim.pruning._unstructured import (
    layer_sparsity,
    prunable_layers,
    weight_of,
)

__all__ = [
    "DEFAULT_TARGETS",
    "PrunerConfig",
    "check_common",
    "finish",
    "outlier_ratio",
    "owl_allocation",
    "owl_sparsities",
    "parse_pattern",
    "pruned_layers",
    "row_mask",
    "wanda_scores",
    "warn_outside",
]

logger = logging.getLogger(__name__)

DEFAULT_TARGETS = ("type:Linear",)


class PrunerConfig(Protocol):
    """The fields Wanda and SparseGPT share."""

    @property
    def sparsity(self) -> float: ...
    @property
    def pattern(self) -> str: ...
    @property
    def owl(self) -> float: ...
    @property
    def owl_threshold(self) -> float: ...
    @property
    def batches(self) -> int: ...
    @property
    def targets(self) -> tuple[str, ...]: ...
    @property
    def ignore(self) -> tuple[str, ...]: ...


def parse_pattern(pattern: str, who: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None, ``"2:4"`` -> ``(2, 4)``; ConfigError unless ``0 < N < M``."""
    if pattern == "unstructured":
        return None
    parts = pattern.split(":")
    try:
        n, m = (int(p) for p in parts) if len(parts) == 2 else (0, 0)
    except ValueError:
        n, m = 0, 0
    if not 0 < n < m:
        raise ConfigError(f"{who}: pattern must be 'unstructured' or 'N:M' with integers 0 < N < M "
                          f"(e.g. '2:4'), got {pattern!r}")
    return n, m


def check_common(cfg: PrunerConfig, who: str) -> None:
    """ConfigError for a bad sparsity, pattern, OWL setting or batch count."""
    if not 0.0 <= cfg.sparsity < 1.0:
        raise ConfigError(f"{who}: sparsity must be in [0, 1), got {cfg.sparsity}")
    nm = parse_pattern(cfg.pattern, who)
    low, high = cfg.sparsity - 2 * cfg.owl, cfg.sparsity + 2 * cfg.owl
    if cfg.owl < 0 or (cfg.owl > 0 and not (low >= 0 and high < 1)):
        raise ConfigError(f"{who}: owl must be >= 0 and keep sparsity +- 2 * owl within [0, 1); got owl "
                          f"{cfg.owl} with sparsity {cfg.sparsity}")
    if cfg.owl > 0 and nm is not None:
        raise ConfigError(f"{who}: owl reallocates unstructured sparsity; it cannot be used with "
                          f"pattern {cfg.pattern!r} (use pattern 'unstructured' or owl 0)")
    if cfg.owl_threshold <= 0:
        raise ConfigError(f"{who}: owl_threshold must be > 0, got {cfg.owl_threshold}")
    if cfg.batches < 1:
        raise ConfigError(f"{who}: batches must be >= 1, got {cfg.batches}")


def wanda_scores(weight: torch.Tensor, squares: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||_2`` for a weight (out, in) and the inputs' sums of squares (in,)."""
    norms = squares.to(device=weight.device, dtype=torch.float32).sqrt()
    return weight.detach().float().abs() * norms[None, :]


@torch.no_grad()
def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep mask dropping exactly ``int(in * sparsity)`` lowest scores of every row (out, in)."""
    n_zero = int(scores.shape[1] * sparsity)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if n_zero:
        drop = scores.argsort(dim=1, stable=True)[:, :n_zero]  # (out, n_zero)
        keep.scatter_(1, drop, False)
    return keep


def outlier_ratio(scores: Sequence[torch.Tensor], threshold: float) -> float:
    """Share of scores above ``threshold`` times their mean, over all given tensors (OWL's LOD)."""
    flat = torch.cat([s.flatten() for s in scores])
    return float((flat > threshold * flat.mean()).float().mean())


def owl_sparsities(ratios: Sequence[float], sparsity: float, spread: float) -> list[float]:
    """Per-block sparsities averaging ``sparsity`` and spanning ``2 * spread``; fewer for more outliers.

    OWL (Yin et al. 2024, Sec. 4 and its code): outlier ratios are scaled linearly onto
    ``[0, 2 * spread]`` and shifted to mean ``1 - sparsity`` as the kept share of each block.
    """
    r = torch.tensor(ratios, dtype=torch.float64)
    if r.numel() == 0 or float(r.max() - r.min()) == 0.0:
        return [sparsity] * r.numel()
    scaled = (r - r.min()) / (r.max() - r.min()) * 2 * spread
    density = scaled - scaled.mean() + (1 - sparsity)
    return [float(1 - d) for d in density]


def pruned_layers(model: nn.Module, cfg: PrunerConfig, nm: tuple[int, int] | None,
                  who: str) -> dict[str, nn.Module]:
    """Selected, untied ``nn.Linear`` layers whose input width fits the N:M pattern."""
    layers: dict[str, nn.Module] = {}
    for fqn, module in prunable_layers(model, cfg.targets, cfg.ignore, who).items():
        width = int(weight_of(module).shape[1])
        if not isinstance(module, nn.Linear):
            logger.warning("%s: skipping %s, only nn.Linear layers are supported (found %s)",
                           who, fqn, type(module).__name__)
        elif nm is not None and width % nm[1]:
            logger.warning("%s: skipping %s, its input width %d is not divisible by M=%d",
                           who, fqn, width, nm[1])
        else:
            layers[fqn] = module
    if nm is not None and not layers:
        raise UnsupportedModuleError(f"{who}: pattern {cfg.pattern} needs nn.Linear layers whose input "
                                     f"width is divisible by {nm[1]}; none of the selected layers is")
    return layers


def owl_allocation(model: nn.Module, layers: dict[str, nn.Module], inputs: list[Any],
                   cfg: PrunerConfig) -> dict[str, float]:
    """Block fqn -> sparsity from outlier ratios of the dense model's Wanda scores (one pass)."""
    ratios: dict[str, float] = {}

    def measure(step: BlockStep) -> None:
        scores = [wanda_scores(weight_of(m), step.stats[f].squares) for f, m in step.layers.items()
                  if f in step.stats]
        if scores:
            ratios[step.fqn] = outlier_ratio(scores, cfg.owl_threshold)

    layerwise(model, inputs, layers=layers, new_stat=_norms, on_block=measure, modifies=False)
    allocation = dict(zip(ratios, owl_sparsities(list(ratios.values()), cfg.sparsity, cfg.owl)))
    logger.info("OWL sparsities per block: %s", {k: round(v, 3) for k, v in allocation.items()})
    return allocation


def _norms(fqn: str, module: nn.Module) -> InputNorms:
    return InputNorms(int(weight_of(module).shape[1]), weight_of(module).device)


def warn_outside(outside: Sequence[str], cfg: PrunerConfig, who: str) -> None:
    """Log the selected layers that lie outside the decoder blocks and so were not pruned."""
    if not outside:
        return
    level = logging.INFO if tuple(cfg.targets) == DEFAULT_TARGETS else logging.WARNING
    logger.log(level, "%s: not pruned, outside the decoder blocks: %s", who, ", ".join(outside))


def finish(model: nn.Module, layers: dict[str, nn.Module], allocation: dict[str, float],
           extra: dict[str, float]) -> Outcome:
    """The Outcome: per-layer and overall sparsity, OWL's range, and ``extra`` stats."""
    per_layer, overall = layer_sparsity(model, layers)
    stats = {"sparsity": overall, **extra}
    if allocation:
        stats["owl_min_sparsity"] = min(allocation.values())
        stats["owl_max_sparsity"] = max(allocation.values())
    return Outcome(model=model, touched=tuple(per_layer), layers=per_layer, stats=stats)
