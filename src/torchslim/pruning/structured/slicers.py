"""Per-layer-type knowledge for physical slicing, registered by module type.

A slicer says which tensors of a layer hold its output channels (dim 0) and input channels
(dim 1), and how to bring the layer's shape attributes (``out_channels``, ``num_features``,
``groups`` ...) in line with its tensors after they were cut. Tensors of layers without a
slicer (a ``layer_scale`` or ``pos_embedding`` on a custom block) are cut all the same; such
layers simply have no attributes to update.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from torchslim.errors import UnsupportedModuleError

__all__ = ["Slicer", "cut", "keep", "register_slicer", "role", "size", "slicer_for", "sync"]


@dataclasses.dataclass(frozen=True)
class Slicer:
    """How one layer type is sliced.

    Attributes:
        dims: For dim 0 (output channels) and dim 1 (input channels), the (tensor name, axis)
            pairs that hold one position per channel.
        sync: Sets the layer's shape attributes from its tensors; returns their names.
        norm: Whether the layer only rescales channels (BatchNorm, LayerNorm ...).
    """

    dims: dict[int, tuple[tuple[str, int], ...]]
    sync: Callable[[Any, dict[str, int]], list[str]]
    norm: bool = False


_SLICERS: dict[type[nn.Module], Slicer] = {}


def register_slicer(*types: type[nn.Module]) -> Callable[[Slicer], Slicer]:
    """Use ``slicer`` for modules of ``types`` (and their subclasses)."""

    def bind(slicer: Slicer) -> Slicer:
        for cls in types:
            _SLICERS[cls] = slicer
        return slicer

    return bind


def slicer_for(module: nn.Module) -> Slicer | None:
    """The slicer of the closest registered base class of ``module``, or None."""
    for cls in type(module).__mro__:
        if cls in _SLICERS:
            return _SLICERS[cls]
    return None


def role(module: nn.Module, name: str, axis: int) -> str:
    """``out`` (makes the channels), ``in`` (reads them), ``norm`` or ``param``."""
    slicer = slicer_for(module)
    if slicer is None:
        return "param"
    if slicer.norm:
        return "norm"
    if (name, axis) in slicer.dims.get(1, ()):
        return "in"
    return "out" if (name, axis) == slicer.dims[0][0] else "param"


def _tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    t = getattr(module, name, None)
    return t if isinstance(t, torch.Tensor) else None


def size(module: nn.Module, dim: int) -> int:
    """Number of output (dim 0) or input (dim 1) channels of ``module``."""
    slicer = slicer_for(module)
    if slicer is None or dim not in slicer.dims:
        raise UnsupportedModuleError(f"no slicer knows dim {dim} of {type(module).__name__}")
    for name, axis in slicer.dims[dim]:
        t = _tensor(module, name)
        if t is not None:
            return int(t.shape[axis])
    raise UnsupportedModuleError(f"{type(module).__name__} holds no tensor for dim {dim}")


@torch.no_grad()
def cut(t: torch.Tensor, axis: int, keep_idx: torch.Tensor) -> torch.Tensor:
    """``t`` restricted to ``keep_idx`` along ``axis``: a new Parameter if ``t`` was one."""
    data = t.detach().index_select(axis, keep_idx.to(t.device)).clone()
    if isinstance(t, nn.Parameter):
        return nn.Parameter(data, requires_grad=t.requires_grad)
    return data


def keep(module: nn.Module, dim: int, keep_idx: Sequence[int] | torch.Tensor) -> list[str]:
    """Keep only ``keep_idx`` (sorted) of ``module``'s output (0) or input (1) channels.

    Returns:
        Names of the attributes that changed.
    """
    slicer = slicer_for(module)
    if slicer is None or dim not in slicer.dims:
        raise UnsupportedModuleError(f"no slicer for dim {dim} of {type(module).__name__}")
    if dim == 1 and getattr(module, "groups", 1) != 1:
        raise UnsupportedModuleError("input channels of a grouped convolution follow its groups; "
                                     "cut its output channels instead")
    idx = torch.as_tensor(keep_idx, dtype=torch.long)
    before = _shape_attrs(module)
    for name, axis in slicer.dims[dim]:
        t = _tensor(module, name)
        if t is not None:
            setattr(module, name, cut(t, axis, idx))
    return sync(module, before)


def _shape_attrs(module: nn.Module) -> dict[str, int]:
    names = ("in_channels", "out_channels", "groups", "in_features", "out_features")
    return {n: int(getattr(module, n)) for n in names if isinstance(getattr(module, n, None), int)}


def sync(module: nn.Module, before: dict[str, int] | None = None) -> list[str]:
    """Update ``module``'s shape attributes from its tensors; ``before``: its old values."""
    slicer = slicer_for(module)
    if slicer is None:
        return []
    return slicer.sync(module, before if before is not None else _shape_attrs(module))


def _sync_linear(m: Any, before: dict[str, int]) -> list[str]:
    m.out_features, m.in_features = m.weight.shape
    return ["in_features", "out_features"]


def _sync_conv(m: Any, before: dict[str, int]) -> list[str]:
    out = int(m.weight.shape[0])
    if before["groups"] > 1:  # whole groups were removed; channels per group stay
        m.groups = out // (before["out_channels"] // before["groups"])
    m.out_channels, m.in_channels = out, m.groups * int(m.weight.shape[1])
    return ["in_channels", "out_channels", "groups"]


def _sync_conv_transpose(m: Any, before: dict[str, int]) -> list[str]:
    m.in_channels, m.out_channels = int(m.weight.shape[0]), int(m.weight.shape[1]) * m.groups
    return ["in_channels", "out_channels"]


def _first_len(m: nn.Module, names: Sequence[str]) -> int | None:
    tensors = (_tensor(m, n) for n in names)
    return next((int(t.shape[0]) for t in tensors if t is not None), None)


def _sync_batch_norm(m: Any, before: dict[str, int]) -> list[str]:
    n = _first_len(m, ("weight", "running_mean"))
    if n is not None:
        m.num_features = n
    return ["num_features"]


def _sync_layer_norm(m: Any, before: dict[str, int]) -> list[str]:
    if m.weight is not None:
        m.normalized_shape = (int(m.weight.shape[0]),)
    return ["normalized_shape"]


def _sync_group_norm(m: Any, before: dict[str, int]) -> list[str]:
    n = _first_len(m, ("weight",))
    if n is not None:
        m.num_channels = n
    return ["num_channels"]


def _sync_embedding(m: Any, before: dict[str, int]) -> list[str]:
    m.num_embeddings, m.embedding_dim = m.weight.shape
    return ["num_embeddings", "embedding_dim"]


def _sync_prelu(m: Any, before: dict[str, int]) -> list[str]:
    m.num_parameters = int(m.weight.numel())
    return ["num_parameters"]


_PER_OUT = (("weight", 0), ("bias", 0))
register_slicer(nn.Linear)(Slicer({0: _PER_OUT, 1: (("weight", 1),)}, _sync_linear))
register_slicer(nn.Conv1d, nn.Conv2d, nn.Conv3d)(Slicer({0: _PER_OUT, 1: (("weight", 1),)}, _sync_conv))
register_slicer(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)(
    Slicer({0: (("weight", 1), ("bias", 0)), 1: (("weight", 0),)}, _sync_conv_transpose))
register_slicer(nn.modules.batchnorm._NormBase)(Slicer(
    {0: (("weight", 0), ("bias", 0), ("running_mean", 0), ("running_var", 0))}, _sync_batch_norm, norm=True))
register_slicer(nn.LayerNorm)(Slicer({0: _PER_OUT}, _sync_layer_norm, norm=True))
register_slicer(nn.GroupNorm)(Slicer({0: _PER_OUT}, _sync_group_norm, norm=True))
register_slicer(nn.Embedding)(Slicer({0: (("weight", 1),), 1: (("weight", 0),)}, _sync_embedding))
register_slicer(nn.PReLU)(Slicer({0: (("weight", 0),)}, _sync_prelu, norm=True))
