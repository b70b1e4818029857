"""All model surgery: module swaps by fqn, masks as parametrizations, and finalize."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "Mask",
    "add_mask",
    "finalize",
    "get_mask",
    "leftovers",
    "plain_layers",
    "replace_modules",
    "shared_parameters",
]

logger = logging.getLogger(__name__)


class Mask(nn.Module):
    """Parametrization ``w -> w * mask`` holding the mask as a buffer."""

    mask: torch.Tensor

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.detach().clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask.to(weight.dtype)


def replace_modules(
    model: nn.Module,
    matches: Iterable[tuple[str, nn.Module]],
    build: Callable[[str, nn.Module], nn.Module | None],
) -> tuple[str, ...]:
    """Swap each matched submodule for ``build(fqn, module)``; returning None keeps it.

    Matches are collected before any change so the model is never mutated mid-iteration.
    """
    replaced = []
    for fqn, old in list(matches):
        if not fqn:
            raise ValueError("cannot replace the root module; return a new model instead")
        new = build(fqn, old)
        if new is None or new is old:
            continue
        parent_fqn, _, child_name = fqn.rpartition(".")
        setattr(model.get_submodule(parent_fqn), child_name, new)
        replaced.append(fqn)
    return tuple(replaced)


def add_mask(module: nn.Module, name: str, mask: torch.Tensor) -> None:
    """Hold ``module.<name>`` multiplied by ``mask``; an existing mask is combined (AND)."""
    current = get_mask(module, name)
    if current is not None:
        current.copy_(current.bool() & mask.bool())
        return
    parametrize.register_parametrization(module, name, Mask(mask.to(torch.bool)))


def get_mask(module: nn.Module, name: str) -> torch.Tensor | None:
    """The mask buffer of ``module.<name>``, or None."""
    if not parametrize.is_parametrized(module, name):
        return None
    parametrizations: Any = module.parametrizations
    for p in parametrizations[name]:
        if isinstance(p, Mask):
            return p.mask
    return None


def finalize(model: nn.Module) -> nn.Module:
    """Bake every parametrization into its tensor (masks become plain zeros)."""
    for module in model.modules():
        if parametrize.is_parametrized(module):
            parametrizations: Any = module.parametrizations
            for name in list(parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return model


def leftovers(model: nn.Module) -> list[str]:
    """Fqns of modules still carrying parametrizations or forward hooks."""
    found = []
    for fqn, module in model.named_modules():
        if (
            parametrize.is_parametrized(module)
            or module._forward_hooks
            or module._forward_pre_hooks
        ):
            found.append(fqn or "<root>")
    return found


def shared_parameters(model: nn.Module) -> list[list[str]]:
    """Groups of parameter names that are the same tensor (tied weights)."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def plain_layers(model: nn.Module, matches: Iterable[tuple[str, nn.Module]],
                 types: tuple[type[nn.Module], ...], who: str,
                 fate: str = "left as they are") -> dict[str, nn.Module]:
    """The matched modules that a method may replace; the others are listed in one warning.

    A module qualifies if its type is exactly one of ``types`` (a subclass may be read by its
    owner, as ``nn.MultiheadAttention`` reads ``out_proj``), a convolution pads with zeros, and
    its weight is not tied to another module's.
    """
    tied = {name for group in shared_parameters(model) for name in group}
    chosen: dict[str, nn.Module] = {}
    skipped = []
    for fqn, module in matches:
        if type(module) not in types or getattr(module, "padding_mode", "zeros") != "zeros":
            names = "/".join(t.__name__ for t in types)
            skipped.append(f"{fqn} ({type(module).__name__} is not a plain {names})")
        elif f"{fqn}.weight" in tied:
            skipped.append(f"{fqn} (weight tied to another layer)")
        else:
            chosen[fqn] = module
    if skipped:
        logger.warning("%s: %d selected module(s) %s: %s", who, len(skipped), fate, "; ".join(skipped))
    return chosen
