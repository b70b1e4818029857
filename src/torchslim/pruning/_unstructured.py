"""Shared math and plumbing of mask-based (unstructured and N:M) pruning methods.

Pure tensor functions (exact top-k masks, per-layer or global) plus the small pieces every
such method repeats: which weights may be pruned, the tensor behind a parametrized weight,
a few batches of data, and the sparsity a set of masks reaches.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from torchslim.core import surgery
from torchslim.core.context import take_batches, to_device
from torchslim.core.select import select

__all__ = [
    "Scope",
    "base_weight",
    "layer_sparsity",
    "masks_for",
    "prunable_layers",
    "take_batches",
    "task_loss",
    "to_device",
    "topk_mask",
    "weight_of",
]

logger = logging.getLogger(__name__)

Scope = Literal["layer", "global"]


def prunable_layers(model: nn.Module, targets: Sequence[str], ignore: Sequence[str],
                    who: str) -> dict[str, nn.Module]:
    """Selected layers with a tensor ``weight``, fqn -> module; tied weights are skipped.

    A weight shared with another layer (a tied embedding / lm_head) would be pruned by one
    layer's criterion for both, so it is left alone with a warning.
    """
    tied = {name for group in surgery.shared_parameters(model) for name in group}
    found: dict[str, nn.Module] = {}
    for fqn, module in select(model, targets, ignore):
        weight = getattr(module, "weight", None)
        if f"{fqn}.weight" in tied or f"{fqn}.parametrizations.weight.original" in tied:
            logger.warning("%s: skipping %s, its weight is tied to another layer", who, fqn)
        elif isinstance(weight, torch.Tensor) and weight.dim() >= 2:
            found[fqn] = module
    return found


def base_weight(module: nn.Module) -> torch.Tensor:
    """The trainable tensor behind ``module.weight`` (the original when parametrized)."""
    if parametrize.is_parametrized(module, "weight"):
        parametrizations: Any = module.parametrizations
        original: torch.Tensor = parametrizations.weight.original
        return original
    return weight_of(module)


def weight_of(module: nn.Module) -> torch.Tensor:
    """``module.weight`` (the masked value when parametrized), typed as a tensor."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)  # prunable_layers only returns such modules
    return weight


@torch.no_grad()
def topk_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean mask keeping the highest ``1 - sparsity`` share of ``scores``.

    Exactly ``int(numel * sparsity)`` entries are dropped: ties at the cutoff are broken by
    position (earlier entries go first), so the count never depends on the values.
    """
    n_zero = int(scores.numel() * sparsity)
    mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if n_zero:
        order = scores.flatten().argsort(stable=True)
        mask[order[:n_zero]] = False
    return mask.view_as(scores)


@torch.no_grad()
def masks_for(scores: Mapping[str, torch.Tensor], sparsity: float, scope: Scope) -> dict[str, torch.Tensor]:
    """Masks per layer: each layer at ``sparsity`` (``layer``), or one ranking over all (``global``)."""
    if scope == "layer":
        return {fqn: topk_mask(s, sparsity) for fqn, s in scores.items()}
    if not scores:
        return {}
    flat = torch.cat([s.detach().flatten().float().cpu() for s in scores.values()])
    kept = topk_mask(flat, sparsity)
    out, offset = {}, 0
    for fqn, s in scores.items():
        out[fqn] = kept[offset:offset + s.numel()].view_as(s).to(s.device)
        offset += s.numel()
    return out


def layer_sparsity(model: nn.Module, fqns: Iterable[str]) -> tuple[dict[str, dict[str, float]], float]:
    """(fqn -> {"sparsity": zero share of its weight mask}, overall zero share)."""
    per_layer: dict[str, dict[str, float]] = {}
    zeros = total = 0
    for fqn in fqns:
        mask = surgery.get_mask(model.get_submodule(fqn), "weight")
        if mask is None:
            continue
        n_zero = int(mask.numel() - int(mask.bool().sum()))
        per_layer[fqn] = {"sparsity": n_zero / max(mask.numel(), 1)}
        zeros, total = zeros + n_zero, total + mask.numel()
    return per_layer, zeros / max(total, 1)


def task_loss(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the outputs' logits (the training driver's default task loss)."""
    logits = getattr(outputs, "logits", outputs)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    loss: torch.Tensor = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return loss
