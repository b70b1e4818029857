"""Groups: the channels that are ranked and removed together, as immutable plain data.

A group is born from the layers that make a set of channels (convolution or linear outputs,
embedding dims) that the trace coupled (a residual stream is one group). Each of its channels is
one coupled unit; removing it removes one position from every slice listed here, whatever
layer, tensor and dim the slice names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

import numpy as np
from torch import nn

from torchslim.pruning.structured import slicers
from torchslim.pruning.structured._elements import FIXED
from torchslim.pruning.structured.graph import ChannelGraph, TensorSlot

__all__ = ["Group", "Slice", "build_groups"]


@dataclasses.dataclass(frozen=True)
class Slice:
    """Positions along ``dim`` of tensor ``name`` of module ``fqn`` that belong to a group.

    Attributes:
        fqn: The module holding the tensor (the first owner of a tied tensor).
        name: The parameter or buffer name on that module.
        dim: The tensor dim.
        role: ``out`` (makes the channels), ``in`` (reads them), ``norm`` or ``param``.
        channels: For each position along ``dim``, its channel in the group, or -1.
    """

    fqn: str
    name: str
    dim: int
    role: str
    channels: tuple[int, ...]
    is_parameter: bool = True


@dataclasses.dataclass(frozen=True)
class Group:
    """Channels removed together.

    Attributes:
        slices: Every tensor dim with positions in this group.
        size: Number of channels that may be removed.
        fixed: Further channels of the producing layers that must stay.
        producers: Fqns of the layers that make the channels.
        prunable: Whether the selectors allow removing channels of this group.
        units: Internal id of each channel (for verification).
    """

    slices: tuple[Slice, ...]
    size: int
    fixed: int
    producers: tuple[str, ...]
    prunable: bool
    units: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        return self.producers[0] if self.producers else "<none>"


def _owner_module(model: nn.Module, slot: TensorSlot) -> tuple[str, str, nn.Module]:
    fqn, name = slot.owners[0]
    return fqn, name, model.get_submodule(fqn)


def _producer_slots(model: nn.Module, slots: list[TensorSlot]) -> list[int]:
    found = []
    for i, slot in enumerate(slots):
        for fqn, name in slot.owners:
            if slicers.role(model.get_submodule(fqn), name, slot.dim) == "out":
                found.append(i)
                break
    return found


def _clusters(roots: list[np.ndarray], producers: list[int]) -> list[list[int]]:
    """Producer slots joined when they share a channel (union-find over slot indices)."""
    parent = {i: i for i in producers}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_slot: dict[int, int] = {}
    for i in producers:
        for r in set(roots[i].tolist()) - {FIXED}:
            parent[find(i)] = find(first_slot.setdefault(r, i))
    members: dict[int, list[int]] = {}
    for i in producers:
        members.setdefault(find(i), []).append(i)
    return list(members.values())


def build_groups(graph: ChannelGraph, model: nn.Module, targets: Collection[str]) -> list[Group]:
    """Group the traced channels; a group is prunable if every producer is in ``targets``."""
    slots = graph.slots
    roots = [graph.elements.roots(s.elements) for s in slots]
    unit_group = np.full(len(graph.elements), -1, dtype=np.int64)
    unit_channel = np.full(len(graph.elements), -1, dtype=np.int64)
    specs = []
    for gi, idx in enumerate(_clusters(roots, _producer_slots(model, slots))):
        units = sorted({r for i in idx for r in roots[i].tolist()} - {FIXED})
        unit_group[units], unit_channel[units] = gi, np.arange(len(units))
        fixed = max(int((roots[i] == FIXED).sum()) for i in idx)
        names = tuple(dict.fromkeys(slots[i].owners[0][0] for i in idx))
        owners = {fqn for i in idx for fqn, _ in slots[i].owners}
        specs.append((units, fixed, names, bool(units) and owners <= set(targets)))
    slices: list[list[Slice]] = [[] for _ in specs]
    for slot, r in zip(slots, roots):
        fqn, name, module = _owner_module(model, slot)
        groups_here, channels = unit_group[r], unit_channel[r]
        for gi in sorted(set(groups_here.tolist()) - {-1}):
            chans = tuple(np.where(groups_here == gi, channels, -1).tolist())
            slices[gi].append(Slice(fqn, name, slot.dim, slicers.role(module, name, slot.dim),
                                    chans, slot.is_parameter))
    return [Group(tuple(sl), len(units), fixed, names, prunable, tuple(units))
            for (units, fixed, names, prunable), sl in zip(specs, slices)]
