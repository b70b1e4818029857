"""Choose the channels to remove, cut them out of every coupled tensor, and check the result.

Cutting is all-or-nothing: every replaced tensor and attribute is remembered, and if the cut
model no longer reproduces the traced shapes (a channel count fixed somewhere in the code),
everything is put back before the error is raised.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from torchslim.core import structure
from torchslim.errors import ConfigError, OutputError, UnsupportedModuleError
from torchslim.pruning.structured import slicers
from torchslim.pruning.structured._hooks import hooked
from torchslim.pruning.structured.graph import ChannelGraph, _Tracer, split_inputs
from torchslim.pruning.structured.group import Group

__all__ = ["Cut", "choose", "cut_channels", "removed_positions", "unfollowable", "verify"]

logger = logging.getLogger(__name__)

_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
          "normalized_shape", "num_channels", "num_embeddings", "embedding_dim", "num_parameters")


def choose(groups: Sequence[Group], scores: Sequence[torch.Tensor], *, ratio: float, round_to: int = 1,
           min_channels: int = 1) -> list[list[int]]:
    """The channels to remove from each group: the lowest-scoring ``ratio`` of its channels.

    Raises:
        ConfigError: The settings would leave a group's producing layer with no channel.
    """
    plan: list[list[int]] = []
    for g, s in zip(groups, scores):
        total = g.size + g.fixed
        if not g.prunable or g.size == 0 or ratio == 0:
            plan.append([])
            continue
        keep = int(round(total * (1.0 - ratio)))
        if round_to > 1 and total >= round_to:
            keep = min(total, max(round_to, int(round(keep / round_to)) * round_to))
        keep = max(keep, min(min_channels, total))
        if keep <= 0:
            raise ConfigError(
                f"pruning.channel: ratio {ratio} leaves {g.name!r} with 0 of its {total} channels "
                f"(min_channels is {min_channels}); lower the ratio or set min_channels >= 1"
            )
        order = torch.argsort(s, stable=True)  # lowest score first; ties go by position
        plan.append(sorted(order[: min(total - keep, g.size)].tolist()))
    return plan


def removed_positions(groups: Sequence[Group], removed: Sequence[Sequence[int]]
                      ) -> dict[tuple[str, str], dict[int, np.ndarray]]:
    """(module fqn, tensor name) -> {dim: sorted positions to remove}."""
    cuts: dict[tuple[str, str], dict[int, set[int]]] = collections.defaultdict(dict)
    for g, rem in zip(groups, removed):
        if not rem:
            continue
        gone = np.asarray(rem)
        for s in g.slices:
            pos = np.flatnonzero(np.isin(np.asarray(s.channels), gone))
            if pos.size:
                cuts[(s.fqn, s.name)].setdefault(s.dim, set()).update(pos.tolist())
    return {key: {d: np.asarray(sorted(p)) for d, p in dims.items()} for key, dims in cuts.items()}


@dataclasses.dataclass
class Cut:
    """What ``cut_channels`` changed, and how to undo it."""

    structure: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    touched: list[str] = dataclasses.field(default_factory=list)
    _tensors: list[tuple[nn.Module, str, torch.Tensor]] = dataclasses.field(default_factory=list)
    _attrs: list[tuple[nn.Module, str, Any]] = dataclasses.field(default_factory=list)

    def undo(self) -> None:
        """Put back every tensor and attribute that was replaced."""
        for module, name, old in reversed(self._tensors):
            _assign(module, name, old)
        for module, name, value in reversed(self._attrs):
            setattr(module, name, value)


def _assign(module: nn.Module, name: str, value: torch.Tensor) -> None:
    if name in module._parameters:
        module._parameters[name] = value  # type: ignore[assignment]
    else:
        module._buffers[name] = value


def _aliases(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    found: dict[int, list[tuple[str, nn.Module, str]]] = collections.defaultdict(list)
    for fqn, module in model.named_modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is not None:
                    found[id(t)].append((fqn, module, name))
    return found


def _keep_indices(model: nn.Module, cuts: dict[tuple[str, str], dict[int, np.ndarray]]
                  ) -> dict[tuple[str, str], dict[int, torch.Tensor]]:
    keeps: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for (fqn, name), dims in cuts.items():
        t = getattr(model.get_submodule(fqn), name)
        for d, gone in dims.items():
            kept = np.setdiff1d(np.arange(t.shape[d]), gone)
            if kept.size == 0:
                raise ConfigError(f"pruning.channel would leave {fqn!r} ({name}, dim {d}) with 0 of "
                                  f"{t.shape[d]} channels; lower the ratio or add it to `ignore`")
            keeps.setdefault((fqn, name), {})[d] = torch.from_numpy(kept)
    return keeps


def cut_channels(model: nn.Module, groups: Sequence[Group], removed: Sequence[Sequence[int]]) -> Cut:
    """Physically remove ``removed[i]`` channels of ``groups[i]`` from ``model``, in place."""
    keeps = _keep_indices(model, removed_positions(groups, removed))
    aliases, result = _aliases(model), Cut()
    replaced = []
    for (fqn, name), dims in keeps.items():
        old = new = getattr(model.get_submodule(fqn), name)
        for d, idx in sorted(dims.items()):
            new = slicers.cut(new, d, idx)
        replaced.append((old, new))
    owners = {fqn: m for old, _ in replaced for fqn, m, _ in aliases[id(old)]}
    before = {fqn: {a: getattr(m, a) for a in _ATTRS if hasattr(m, a)} for fqn, m in owners.items()}
    params: dict[str, list[str]] = collections.defaultdict(list)
    for old, new in replaced:
        for fqn, module, name in aliases[id(old)]:  # tied tensors stay one tensor
            result._tensors.append((module, name, old))
            _assign(module, name, new)
            params[fqn].append(name)
    for fqn, module in owners.items():
        result._attrs += [(module, a, v) for a, v in before[fqn].items()]
        attrs = slicers.sync(module, {a: v for a, v in before[fqn].items() if isinstance(v, int)})
        result.structure[fqn] = _entry(module, attrs, params[fqn])
    for source, targets in _ties(owners, [aliases[id(old)] for old, _ in replaced]).items():
        result.structure[source]["tie"] = targets  # rebuilt modules would each get their own tensor
    result.touched = sorted(owners)
    return result


def _ties(owners: dict[str, nn.Module],
          shared: list[list[tuple[str, nn.Module, str]]]) -> dict[str, list[str]]:
    """Source fqn -> modules that use every parameter of it (a tied head), for structure.json.

    Only whole-module ties are recorded: each parameter of the source must be the very tensor
    the target holds under the same name (an Embedding and the Linear head tied to it).
    """
    ties: dict[str, list[str]] = {}
    for holders in shared:
        fqns = list(dict.fromkeys(fqn for fqn, _, _ in holders))
        if len(fqns) < 2:
            continue
        fqns.sort(key=lambda f: len(list(owners[f].parameters(recurse=False))))
        source, params = fqns[0], dict(owners[fqns[0]].named_parameters(recurse=False))
        for target in fqns[1:]:
            held = dict(owners[target].named_parameters(recurse=False))
            whole = bool(params) and all(held.get(n) is p for n, p in params.items())
            if whole and target not in ties.get(source, []):
                ties.setdefault(source, []).append(target)
    return ties


def _entry(module: nn.Module, attrs: list[str], params: list[str]) -> dict[str, Any]:
    """How structure.json rebuilds this module: swap it if its class is allow-listed."""
    try:
        structure.module_spec(module)
        return {}
    except OutputError:
        names = [a for a in attrs if hasattr(module, a)]
        return {"attrs": names, "params": sorted(set(params)), "keep_module": True}


def verify(model: nn.Module, graph: ChannelGraph, groups: Sequence[Group],
           removed: Sequence[Sequence[int]], example_inputs: Any) -> str | None:
    """Run the cut model once; describe the first call whose output shape is not as planned."""
    el = graph.elements
    gone_units = {g.units[c] for g, rem in zip(groups, removed) for c in rem}
    roots = np.fromiter((el.find(e) for e in range(len(el))), dtype=np.int64, count=len(el))
    gone = np.isin(roots, np.fromiter(gone_units, dtype=np.int64, count=len(gone_units)))
    recorder = _Tracer(model, graph.opaque, labelling=False)
    args, kwargs = split_inputs(example_inputs)
    flags = [(m, m.training) for m in model.modules()]
    try:
        with hooked(model, recorder), torch.no_grad(), recorder:
            model.eval()
            model(*args, **kwargs)
    except Exception as exc:
        where = recorder.where()
        return f"the cut model fails in {where!r} ({type(exc).__name__}: {exc})"
    finally:
        for m, training in flags:
            m.training = training
    for want, got in zip(graph.calls, recorder.calls):
        shapes = tuple(tuple(n - int(gone[lab[d]].sum()) if d in lab else n for d, n in enumerate(shape))
                       for shape, lab in zip(want.shapes, want.labels))
        if got.name != want.name:
            return (f"the operations differ from the trace: {got.name} in {got.where!r} runs where "
                    f"{want.name} in {want.where!r} ran (control flow depends on a channel count)")
        if got.shapes != shapes:
            return f"{want.name} in {want.where!r} gives {list(got.shapes)} instead of {list(shapes)}"
    if len(graph.calls) != len(recorder.calls):
        return f"the cut model runs {len(recorder.calls)} operations instead of {len(graph.calls)}"
    return None


def unfollowable(problem: str) -> UnsupportedModuleError:
    """The error for a cut model that does not run as traced."""
    where = problem.split("'")[1] if "'" in problem else "<model>"
    hint = "the layers involved" if where == "<model>" else repr(where)
    return UnsupportedModuleError(
        f"pruning.channel cannot follow the model: after cutting, {problem}; a channel count "
        f"seems fixed in the code there. The model is unchanged; add {hint} to `ignore`"
    )
