"""Floating-point operations of one forward pass, counted by PyTorch's own FLOP counter.

``torch.utils.flop_counter.FlopCounterMode`` sees every aten op the forward pass runs, so
functional calls, attention and custom blocks are counted without per-layer hooks. Ops it has
no formula for (element-wise activations, normalization, integer kernels) count as zero.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from torchslim.measure._state import eval_mode, split_inputs

__all__ = ["count_flops"]

logger = logging.getLogger(__name__)


def count_flops(model: nn.Module, example_inputs: Any) -> int:
    """Count the FLOPs of ``model(example_inputs)`` in eval mode.

    The unit is FLOPs, not MACs: one multiply-add counts as 2, so ``Linear(64, 32)`` on a batch
    of 8 costs ``2 * 8 * 64 * 32``. The count is for the batch given, not per sample.

    Args:
        model: The model; its train/eval mode is restored afterwards.
        example_inputs: A tensor, a tuple of tensors (positional arguments) or a dict (keyword
            arguments), already on the model's device.

    Returns:
        Total FLOPs of one forward pass.
    """
    from torch.utils.flop_counter import FlopCounterMode

    args, kwargs = split_inputs(example_inputs)
    counter = FlopCounterMode(display=False)
    with eval_mode(model), torch.no_grad(), counter:
        model(*args, **kwargs)
    return int(counter.get_total_flops())
