"""Parameter counts, total and nonzero, including weights stored as integer buffers.

The counting rule, chosen so that quantizing a model does not make its weights vanish from the
count:

- every floating-point parameter counts (masks, scales and running statistics are buffers and
  do not);
- an integer tensor (a buffer, or a frozen integer parameter) counts when its own name ends in
  ``weight`` or starts with ``q``: ``qweight``, ``int8_weight``, ``qzeros``. This is how packed
  and quantized weights are stored, so a ``Linear`` whose weight became an int8 ``qweight`` buffer
  reports the same count. Packed storage counts stored elements: an int4 tensor packed two per
  byte counts half its logical size.
- boolean tensors never count; shared (tied) tensors count once.

A masked weight (a ``torch.nn.utils.parametrize`` parametrization) counts its nonzeros after
the mask is applied, so sparsity shows before ``finalize`` bakes it in.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["count_params", "counts_as_param"]

logger = logging.getLogger(__name__)


def counts_as_param(name: str, tensor: torch.Tensor, *, is_parameter: bool) -> bool:
    """Whether a tensor holds model weights under the counting rule of this module.

    Args:
        name: The tensor's own attribute name (the last part of its fqn).
        tensor: The parameter or buffer.
        is_parameter: Whether it is an ``nn.Parameter`` (else a buffer).
    """
    if tensor.dtype == torch.bool:
        return False
    if tensor.is_floating_point() or tensor.is_complex():
        return is_parameter
    return name.endswith("weight") or name.startswith("q")


def _counted(model: nn.Module) -> Iterator[tuple[nn.Module, str, torch.Tensor]]:
    """(owner module, own name, tensor) of every counted tensor, each tensor once."""
    seen: set[int] = set()
    for module in model.modules():
        named: list[tuple[str, torch.Tensor, bool]] = [
            (n, t, True) for n, t in module.named_parameters(recurse=False)
        ]
        named += [(n, t, False) for n, t in module.named_buffers(recurse=False)]
        for name, tensor, is_parameter in named:
            if id(tensor) in seen or not counts_as_param(name, tensor, is_parameter=is_parameter):
                continue
            seen.add(id(tensor))
            yield module, name, tensor


def _masked_views(model: nn.Module) -> dict[int, tuple[nn.Module, str]]:
    """id(original tensor) -> (module, name) for parametrized (e.g. masked) tensors."""
    views: dict[int, tuple[nn.Module, str]] = {}
    for module in model.modules():
        parametrizations = getattr(module, "parametrizations", None)
        if not isinstance(parametrizations, nn.ModuleDict):
            continue
        for name, entry in parametrizations.items():
            original = getattr(entry, "original", None)
            if isinstance(original, torch.Tensor):
                views[id(original)] = (module, name)
    return views


@torch.no_grad()
def count_params(model: nn.Module) -> tuple[int, int]:
    """Return (total, nonzero) weight counts; tied weights are counted once.

    See the module docstring for which tensors count.
    """
    views = _masked_views(model)
    total = nonzero = 0
    for _, _, tensor in _counted(model):
        total += tensor.numel()
        if id(tensor) in views:
            owner, name = views[id(tensor)]
            tensor = getattr(owner, name)  # the weight as the model sees it, mask applied
        nonzero += int(torch.count_nonzero(tensor))
    return total, nonzero
