"""Which Linear layers feed an activation module and nothing else, found by running the model once.

A quantized Linear can apply GELU or ReLU as its results leave the GEMM, which saves a pass over
the output (on all-MiniLM-L6-v2 it made the per-tensor int8 model about 5% faster). Hugging
Face models call their activation modules from ``forward`` methods that ``torch.fx`` cannot
trace, so the pairs are found on one example batch instead: a parameter-free leaf module whose
only call received exactly a selected Linear's output tensor, and whose output equals one of
``ACTIVATIONS`` of it but not the tensor itself (a Dropout, or a ReLU that saw no negative
value, proves nothing). Then the fusion is checked in float: with each Linear returning
``act(linear(x))`` and each absorbed module passing its input through, the model's outputs must
not change. A pair that changes them (the Linear's output was also read elsewhere) is dropped.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from torchslim.core import HookSet
from torchslim.core.layerwise import model_call
from torchslim.quantization.modules import ACTIVATIONS

__all__ = ["find_activations"]


Pairs = dict[str, tuple[str, str]]  # Linear fqn -> (activation name, activation module fqn)


def find_activations(model: nn.Module, linears: dict[str, nn.Module], batch: Any) -> Pairs:
    """For each Linear of ``linears`` (fqn -> module) that may absorb its activation:
    ``fqn -> (activation name, fqn of the activation module)``, from one run on ``batch``."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            pairs, reference = _observe(model, linears, batch)
            if not pairs:
                return {}
            if _same_outputs(model, batch, reference, pairs):
                return pairs
            # some pair changed the outputs: keep the ones that do not, each checked on its own
            return {fqn: pair for fqn, pair in pairs.items()
                    if _same_outputs(model, batch, reference, {fqn: pair})}
    finally:
        model.train(was_training)


def _observe(model: nn.Module, linears: dict[str, nn.Module], batch: Any) -> tuple[Pairs, Any]:
    """The candidate pairs seen on ``batch``, and the model's output."""
    # id(output) -> (linear fqn, weak reference): holding the outputs themselves would keep every
    # Linear's activations of the batch alive at once (gigabytes for an LLM)
    produced: dict[int, tuple[str, weakref.ref[torch.Tensor]]] = {}
    calls: dict[str, int] = {}
    seen: dict[str, tuple[str, str]] = {}  # activation module fqn -> (linear fqn, activation)

    def on_linear(fqn: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: tuple[Any, ...], out: Any) -> None:
            calls[fqn] = calls.get(fqn, 0) + 1
            if isinstance(out, torch.Tensor):
                produced[id(out)] = (fqn, weakref.ref(out))
        return hook

    pending: dict[str, tuple[str, torch.Tensor]] = {}  # candidate fqn -> (linear fqn, copy of its input)

    def before_candidate(fqn: str) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            calls[fqn] = calls.get(fqn, 0) + 1
            x = args[0] if len(args) == 1 else None
            source = produced.get(id(x)) if isinstance(x, torch.Tensor) else None
            if isinstance(x, torch.Tensor) and source is not None and source[1]() is x:
                pending[fqn] = (source[0], x.clone())  # a copy: an in-place ReLU overwrites x
        return hook

    def after_candidate(fqn: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: tuple[Any, ...], out: Any) -> None:
            linear_fqn, x = pending.pop(fqn, ("", None))
            if x is None or not isinstance(out, torch.Tensor) or _equal(out, x):
                return  # not fed by a Linear, or the identity on this batch (a Dropout, or ReLU of x >= 0)
            name = next((n for n, act in ACTIVATIONS.items() if _equal(out, act(x))), None)
            if name is not None:
                seen[fqn] = (linear_fqn, name)
        return hook

    with HookSet() as hooks:
        for fqn, module in linears.items():
            hooks.forward(module, on_linear(fqn))
        for fqn, module in _candidates(model, linears):
            hooks.forward_pre(module, before_candidate(fqn))
            hooks.forward(module, after_candidate(fqn))
        args, kwargs = model_call(model, batch)
        reference = model(*args, **kwargs)
    by_linear: dict[str, list[str]] = {}
    for act_fqn, (linear_fqn, _name) in seen.items():
        by_linear.setdefault(linear_fqn, []).append(act_fqn)
    pairs = {}
    for linear_fqn, acts in by_linear.items():
        act_fqn = acts[0]
        if len(acts) == 1 and calls.get(linear_fqn) == 1 and calls.get(act_fqn) == 1:
            pairs[linear_fqn] = (seen[act_fqn][1], act_fqn)
    return pairs, reference


def _candidates(model: nn.Module, linears: dict[str, nn.Module]) -> Iterator[tuple[str, nn.Module]]:
    """Leaf modules without parameters or buffers: what an activation module looks like."""
    for fqn, module in model.named_modules():
        if fqn in linears or next(module.children(), None) is not None:
            continue
        state = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if not state:
            yield fqn, module


def _same_outputs(model: nn.Module, batch: Any, reference: Any, pairs: Pairs) -> bool:
    """Does the model, with ``pairs`` fused in float (by hooks), give ``reference`` again?"""
    modules = dict(model.named_modules())

    def apply(name: str) -> Callable[..., torch.Tensor]:
        return lambda _m, _args, out: ACTIVATIONS[name](out)

    def passthrough(_m: nn.Module, args: tuple[Any, ...], _out: Any) -> Any:
        return args[0]

    with HookSet() as hooks:
        for linear_fqn, (name, act_fqn) in pairs.items():
            hooks.forward(modules[linear_fqn], apply(name))
            hooks.forward(modules[act_fqn], passthrough)
        args, kwargs = model_call(model, batch)
        fused = model(*args, **kwargs)
    mine, theirs = list(_tensors(fused)), list(_tensors(reference))
    if len(mine) != len(theirs):
        return False
    return all(a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6)
               for a, b in zip(mine, theirs, strict=True))


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def _tensors(out: Any) -> Iterator[torch.Tensor]:
    """Every tensor of a (nested) model output, in order."""
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, dict):
        for value in out.values():
            yield from _tensors(value)
    elif isinstance(out, (list, tuple)):
        for value in out:
            yield from _tensors(value)
