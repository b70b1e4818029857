"""BatchNorm statistics recomputed on a few batches: a pruned or sliced network's layers see other
inputs than the statistics were gathered on, and judging it with the old ones scores it near chance
(adaptive BatchNorm, Li et al., "EagleEye", ECCV 2020, https://arxiv.org/abs/2007.02491)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from torchslim.core.config import check
from torchslim.core.context import first_batch_inputs, to_device

__all__ = ["batchnorms", "recalibrate_batchnorm"]


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer of ``model`` (1d, 2d, 3d and SyncBatchNorm) that tracks running statistics."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Sequence[Any], who: str,
                          device: str | torch.device = "cpu") -> nn.Module:
    """Replace every BatchNorm's running statistics by their average over ``batches`` (model inputs,
    or (inputs, targets) pairs); the model is left in eval mode with its momenta unchanged. ``who``
    names the caller in the error raised for empty ``batches``."""
    check(len(batches) > 0, f"{who}: the calibration data for BatchNorm statistics is empty; "
                            "expected at least one batch")
    norms = batchnorms(model)
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
    model.train()
    try:
        for batch in batches:
            inputs = to_device(first_batch_inputs(batch), torch.device(device))
            model(**inputs) if isinstance(inputs, dict) else model(inputs)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
    return model.eval()
