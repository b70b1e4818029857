"""Trace a model once and find which channels must be removed together.

The tracer runs one real forward pass under a ``TorchFunctionMode``: every torch call is seen
with its concrete arguments, so Python control flow, functional calls and custom blocks need no
symbolic tracing (torch.fx fails on many torchvision models). Each parameter dim gets one
element per position; the labelling rules in ``_rules`` carry elements along activations and
couple those that must be removed together (residual adds, concatenations, grouped convs,
norms, tied weights). A call we cannot follow keeps every channel reaching it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
from collections.abc import Collection, Iterator
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from torchslim.errors import UnsupportedModuleError
from torchslim.pruning.structured._elements import Elements, Labels
from torchslim.pruning.structured._hooks import hooked
from torchslim.pruning.structured._ops import opaque, tensors
from torchslim.pruning.structured._rules import op_name, rule_for
from torchslim.pruning.structured._shape import Call

__all__ = ["ChannelGraph", "OpRecord", "TensorSlot", "trace"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TensorSlot:
    """One labelled dim of a parameter or buffer; ``owners`` lists every (module fqn, name)."""

    owners: tuple[tuple[str, str], ...]
    dim: int
    elements: Any  # np.ndarray of element ids, one per position
    is_parameter: bool


@dataclasses.dataclass(frozen=True)
class OpRecord:
    """A traced call: its name, where it ran, and its outputs' shapes and labels."""

    name: str
    where: str
    shapes: tuple[tuple[int, ...], ...]
    labels: tuple[Labels, ...]


@dataclasses.dataclass
class ChannelGraph:
    """What one trace found: coupled elements, labelled tensors, and the calls it saw."""

    elements: Elements
    slots: list[TensorSlot]
    calls: list[OpRecord]
    module_out: dict[str, Labels]
    blocked: collections.Counter[str]
    opaque: set[str]


_SIZE_READS = {"size", "shape", "numel", "len"}


class _Tracer(TorchFunctionMode):
    """Label propagation (``labelling=True``) or plain call recording (for verification)."""

    def __init__(self, model: nn.Module, opaque_fqns: Collection[str], *, labelling: bool = True,
                 strict_sizes: bool = False) -> None:
        super().__init__()
        self.el = Elements()
        self.labelling = labelling
        self.strict_sizes = strict_sizes
        self.recording = True
        self.opaque_fqns = set(opaque_fqns)
        self.depth = 0
        self.stack: list[str] = []
        self.calls: list[OpRecord] = []
        self.module_out: dict[str, Labels] = {}
        self.blocked: collections.Counter[str] = collections.Counter()
        self.used: set[str] = set()
        self._labels: dict[int, Labels] = {}
        self._alive: list[torch.Tensor] = []  # keeps ids unique while the trace runs
        self._stored: dict[int, torch.Tensor] = {}
        for module in model.modules():
            for t in (*module._parameters.values(), *module._buffers.values()):
                if t is not None:
                    self._stored[id(t)] = t

    def get(self, t: torch.Tensor) -> Labels:
        key = id(t)
        labels = self._labels.get(key)
        if labels is None and key in self._stored:  # fresh elements on each dim of a weight
            labels = {d: self.el.new(n) for d, n in enumerate(t.shape) if n > 1}
            self._labels[key] = labels
        return labels if labels is not None else {}

    def set(self, t: torch.Tensor, labels: Labels) -> None:
        if id(t) in self._stored:  # a weight's own labels never change
            return
        self._labels[id(t)] = labels
        self._alive.append(t)

    def stored_labels(self) -> dict[int, Labels]:
        return {key: self._labels[key] for key in self._stored if key in self._labels}

    def where(self) -> str:
        return self.stack[-1] if self.stack and self.stack[-1] else "<model>"

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth:
            return out
        name = op_name(func)
        outs = list(tensors(out))
        ins = list(tensors((args, kwargs)))
        if self.strict_sizes and name in _SIZE_READS and ins:
            self._size_read(ins[0], args[1] if name == "size" and len(args) > 1 else None)
        if not ins or (not outs and name != "setitem"):
            return out
        if self.labelling and any(self.get(t) for t in ins):
            self._label(Call(name, func, tuple(args), kwargs, out))
        if self.recording and outs:
            labels = tuple(self.get(o) for o in outs) if self.labelling else ()
            self.calls.append(OpRecord(name, self.where(), tuple(tuple(o.shape) for o in outs), labels))
        return out

    def _size_read(self, t: torch.Tensor, dim: Any) -> None:
        """Code that reads a channel count may bake it into a shape: keep that dim."""
        labels = self.get(t)
        for d, v in labels.items():
            if dim is None or (isinstance(dim, int) and d == dim % max(t.dim(), 1)):
                self.el.fix(v)

    def _label(self, call: Call) -> None:
        rule = rule_for(call.name)
        if rule is opaque:
            self.blocked[f"{call.name} (in {self.where()})"] += 1
        try:
            rule(self, call)
        except Exception as exc:  # a rule that does not fit this call: keep its channels
            logger.debug("channel graph: rule for %s failed at %s: %s", call.name, self.where(), exc)
            self.blocked[f"{call.name} (in {self.where()})"] += 1
            opaque(self, call)

    def enter(self, fqn: str, module: nn.Module, args: Any, kwargs: Any) -> None:
        self.stack.append(fqn)
        self.used.add(fqn)
        if self.depth or fqn in self.opaque_fqns:
            self.depth += 1

    def leave(self, fqn: str, module: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        self.stack.pop()
        if self.depth:
            self.depth -= 1
            if self.depth == 0 and self.labelling:
                self._seal(module, (args, kwargs), out)
            return
        outs = list(tensors(out))
        if self.labelling and outs and fqn not in self.module_out:
            self.module_out[fqn] = dict(self.get(outs[0]))

    def _seal(self, module: nn.Module, inputs: Any, out: Any) -> None:
        """An opaque module keeps its inputs, outputs and weights exactly as they are."""
        for t in (*tensors(inputs), *module.parameters(), *module.buffers()):
            self.el.fix_labels(self.get(t))
        for t in tensors(out):
            self.set(t, {})


def _inside(fqn: str, fqns: Collection[str]) -> bool:
    return any(fqn == f or fqn.startswith(f + ".") for f in fqns)


def _opaque_modules(model: nn.Module, ignore: Collection[str]) -> set[str]:
    found = set()
    for fqn, module in model.named_modules():
        if isinstance(module, torch.jit.ScriptModule) and not _inside(fqn, ignore):
            raise UnsupportedModuleError(
                f"pruning.channel cannot follow {fqn or '<model>'}: its operation "
                f"{type(module).__name__}.forward is TorchScript, which runs outside Python; "
                f"add {fqn!r} to `ignore` to keep it as it is"
            )
        if fqn in ignore or isinstance(module, nn.MultiheadAttention):
            found.add(fqn)  # attention heads are pruned by pruning.heads, not here
        elif hasattr(module, "parametrizations"):
            logger.warning("pruning.channel: %s has parametrizations (masks); its channels are kept", fqn)
            found.add(fqn)
    return found


def split_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional and keyword arguments for ``model(...)`` from a tensor, tuple or dict."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


@contextlib.contextmanager
def _kept_modes(model: nn.Module) -> Iterator[None]:
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def trace(model: nn.Module, example_inputs: Any, *, ignore: Collection[str] = (),
          strict_sizes: bool = False, fixed_outputs: bool = True) -> ChannelGraph:
    """Run ``model`` once on ``example_inputs`` and record how its channels are coupled.

    Args:
        model: The model; its weights, buffers and train/eval flags are left as they were.
        example_inputs: One input batch (tensor, tuple of positional inputs, or dict).
        ignore: Fqns of modules kept exactly as they are (opaque to the tracer).
        strict_sizes: Keep every dim whose size the model's code reads (``x.shape``,
            ``x.size(1)``): the safe fallback when a read size ends up in a reshape.
        fixed_outputs: The model's outputs keep their shape (False: their channels may go too).

    Raises:
        UnsupportedModuleError: A TorchScript submodule that is not in ``ignore``.
    """
    opaque_fqns = _opaque_modules(model, ignore)
    tracer = _Tracer(model, opaque_fqns, strict_sizes=strict_sizes)
    args, kwargs = split_inputs(example_inputs)
    with hooked(model, tracer), _kept_modes(model), torch.no_grad():
        model.eval()
        with tracer:
            out = model(*args, **kwargs)
        tracer.recording = False
        for t in tensors(out) if fixed_outputs else ():  # the model's outputs keep their shape
            tracer.el.fix_labels(tracer.get(t))
        unused = [f for f, m in model.named_modules() if f not in tracer.used and _owns_weights(m)]
        if unused:
            _training_pass(model, tracer, args, kwargs, unused, fixed_outputs)
    return ChannelGraph(tracer.el, _slots(model, tracer), tracer.calls, tracer.module_out, tracer.blocked,
                        opaque_fqns)


def _owns_weights(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def _training_pass(model: nn.Module, tracer: _Tracer, args: Any, kwargs: Any, unused: list[str],
                   fixed_outputs: bool) -> None:
    """Trace again in training mode for layers only training runs (auxiliary heads)."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    model.train()
    try:
        with torch.random.fork_rng(devices=[]), tracer:
            out = model(*args, **kwargs)
        for t in tensors(out) if fixed_outputs else ():
            tracer.el.fix_labels(tracer.get(t))
    except Exception as exc:  # e.g. BatchNorm refuses one sample in training mode
        logger.warning("pruning.channel: training-mode trace failed (%s); layers used only in "
                       "training keep their channels: %s", exc, ", ".join(unused[:5]))
    finally:
        for buffer, saved in buffers:
            buffer.copy_(saved)
    for fqn, module in model.named_modules():
        if fqn in unused and fqn not in tracer.used:
            for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
                tracer.el.fix_labels(tracer.get(t))


def _slots(model: nn.Module, tracer: _Tracer) -> list[TensorSlot]:
    owners: dict[int, list[tuple[str, str]]] = collections.defaultdict(list)
    kinds: dict[int, bool] = {}
    for fqn, module in model.named_modules():
        for table, is_param in ((module._parameters, True), (module._buffers, False)):
            for name, t in table.items():
                if t is not None:
                    owners[id(t)].append((fqn, name))
                    kinds[id(t)] = is_param
    return [TensorSlot(tuple(owners[key]), dim, vec, kinds[key])
            for key, labels in tracer.stored_labels().items() for dim, vec in sorted(labels.items())]
