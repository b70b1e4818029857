"""SNIP: prune at initialization by connection sensitivity |g * w| (Lee et al. 2019).

One or a few batches give the gradient of the task loss with respect to every selected
weight; the weights whose removal changes the loss least (smallest ``|g * w|``) are masked.
Gradients are taken with ``torch.autograd.grad``, so no ``.grad`` is left on the model.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from torchslim.core import Context, MethodConfig, Outcome, check, register, surgery
from torchslim.errors import DataError
from torchslim.pruning._unstructured import (
    Scope,
    base_weight,
    layer_sparsity,
    masks_for,
    prunable_layers,
    take_batches,
    task_loss,
    to_device,
)

__all__ = ["SnipPruningConfig", "apply", "connection_sensitivity"]

logger = logging.getLogger(__name__)

_NAME = "pruning.snip"

LossFn = Callable[[Any, Any], torch.Tensor]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SnipPruningConfig(MethodConfig):
    """Zero the weights with the smallest connection sensitivity ``|g * w|``.

    Paper: Lee, Ajanthan, Torr, "SNIP: Single-shot Network Pruning based on Connection
    Sensitivity", ICLR 2019, https://arxiv.org/abs/1810.02340

    Args:
        sparsity: Fraction of the selected weights set to zero, in [0, 1).
        scope: ``global`` ranks all selected weights together (the paper's choice);
            ``layer`` prunes each layer to ``sparsity``.
        batches: Batches whose task-loss gradients are summed (the paper uses one).
        targets: Layer selectors: an fqn, ``re:<regex>`` or ``type:<ClassName>``.
        ignore: Selectors removed from ``targets``.

    Recipe:
        - method: pruning.snip
          sparsity: 0.9
          scope: global
          batches: 1

    Notes:
        Batches come from ``ctx.train_data``, else ``ctx.calib_data``. ``(inputs, targets)``
        batches use ``ctx.loss_fn`` (cross-entropy by default); batches without targets use
        the L2 norm of the outputs as the loss, a label-free stand-in (logged, and reported
        as ``used_labels: 0``). The gradient pass runs in eval mode (BatchNorm statistics and
        dropout untouched), then the model's mode and every ``requires_grad`` flag are
        restored; no ``.grad`` tensors are created. Tied weights are skipped. The saved file
        stores the zeros compactly; dense kernels run no faster.
    """

    name: ClassVar[str] = _NAME
    sparsity: float = 0.5
    scope: Scope = "global"
    batches: int = 1
    targets: tuple[str, ...] = ("type:Linear", "type:Conv2d", "type:Conv1d")
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check(0.0 <= self.sparsity < 1.0, f"{_NAME}: sparsity must be in [0, 1), got {self.sparsity}")
        check(self.scope in ("global", "layer"),
              f"{_NAME}: scope must be 'global' or 'layer', got {self.scope!r}")
        check(self.batches >= 1, f"{_NAME}: batches must be >= 1, got {self.batches}")


@register(SnipPruningConfig)
def apply(model: nn.Module, cfg: SnipPruningConfig, ctx: Context) -> Outcome:
    """Mask the least sensitive weights of the selected layers."""
    layers = prunable_layers(model, cfg.targets, cfg.ignore, _NAME)
    if not layers:
        logger.warning("%s: no selected layer has a prunable (untied) weight; nothing to do", _NAME)
        return Outcome(model=model)
    data = ctx.train_data if ctx.train_data is not None else ctx.calib_data
    if data is None:
        raise DataError(f"{_NAME} needs a few batches: set ctx.train_data or ctx.calib_data (both are None)")
    batches = take_batches(data, cfg.batches)
    if not batches:
        raise DataError(f"{_NAME}: the data gave no batch (expected at least 1 of {cfg.batches})")
    scores, labelled = connection_sensitivity(model, layers, batches, ctx.loss_fn)
    for fqn, mask in masks_for(scores, cfg.sparsity, cfg.scope).items():
        surgery.add_mask(layers[fqn], "weight", mask)
    per_layer, overall = layer_sparsity(model, layers)
    return Outcome(model=model, touched=tuple(per_layer), layers=per_layer,
                   stats={"sparsity": overall, "used_labels": float(labelled)})


def connection_sensitivity(
    model: nn.Module, layers: dict[str, nn.Module], batches: Sequence[Any], loss_fn: LossFn | None = None
) -> tuple[dict[str, torch.Tensor], bool]:
    """(fqn -> ``|g * w|`` of its weight, whether every batch had targets).

    ``g`` is the gradient of the loss summed over ``batches``, taken in eval mode. A masked
    weight's gradient is zero, so already-pruned weights score 0.
    """
    params = {fqn: base_weight(m) for fqn, m in layers.items()}
    flags = {fqn: p.requires_grad for fqn, p in params.items()}
    totals = {fqn: torch.zeros_like(p) for fqn, p in params.items()}
    was_training, labelled = model.training, True
    device = next(iter(params.values())).device
    model.eval()
    try:
        for p in params.values():
            p.requires_grad_(True)
        for batch in batches:
            inputs, targets = _split(to_device(batch, device))
            labelled = labelled and targets is not None
            with torch.enable_grad():
                loss = _loss(model(inputs), targets, loss_fn)
                grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for fqn, g in zip(params, grads):
                if g is not None:
                    totals[fqn] += g.detach()
    finally:
        for fqn, p in params.items():
            p.requires_grad_(flags[fqn])
        model.train(was_training)
    if not labelled:
        logger.warning("%s: batches without targets; using the output norm as the loss", _NAME)
    return {fqn: (totals[fqn] * p.detach()).abs() for fqn, p in params.items()}, labelled


def _split(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0], batch[1]
    return batch, None


def _loss(outputs: Any, targets: Any, loss_fn: LossFn | None) -> torch.Tensor:
    if targets is None:
        logits = getattr(outputs, "logits", outputs)
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        norm: torch.Tensor = logits.float().norm()
        return norm
    return (loss_fn or task_loss)(outputs, targets)
