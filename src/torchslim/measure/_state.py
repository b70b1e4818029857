"""Helpers that let measurements run a model without leaving a trace on it.

Each context manager restores exactly what it changed: every submodule's own train/eval
flag (a frozen BatchNorm inside a training model stays frozen), every parameter's
``requires_grad`` and the model's device.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from torchslim.errors import DataError

__all__ = ["eval_mode", "kept_requires_grad", "on_device", "split_inputs", "to_device"]

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode; restore each submodule's own flag on exit."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


@contextlib.contextmanager
def kept_requires_grad(model: nn.Module) -> Iterator[nn.Module]:
    """Restore every parameter's ``requires_grad`` on exit, whatever the body did."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield model
    finally:
        for param, requires_grad in flags:
            param.requires_grad_(requires_grad)


def _model_device(model: nn.Module) -> torch.device | None:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return None


@contextlib.contextmanager
def on_device(model: nn.Module, device: str | torch.device) -> Iterator[nn.Module]:
    """Move ``model`` to ``device`` for the body and back to where it was afterwards."""
    target = torch.device(device)
    home = _model_device(model)
    moved = home is not None and home != target
    if moved:
        logger.debug("measuring on %s: moving the model from %s", target, home)
        model.to(target)
    try:
        yield model
    finally:
        if moved:
            model.to(home)


def to_device(inputs: Any, device: str | torch.device) -> Any:
    """``inputs`` (a tensor, or tuples, lists and dicts of them) moved to ``device``."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return {key: to_device(value, device) for key, value in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(to_device(value, device) for value in inputs)
    return inputs


def split_inputs(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` for ``model(*args, **kwargs)`` from example inputs.

    A tensor is one positional argument, a tuple or list gives the positional arguments and
    a mapping gives keyword arguments (e.g. ``input_ids`` and ``attention_mask``).
    """
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    raise DataError(
        f"example inputs must be a tensor, a tuple of tensors or a dict of keyword arguments; "
        f"found {type(inputs).__name__}"
    )
