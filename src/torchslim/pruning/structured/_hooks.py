"""Temporary module hooks for the tracer: a module stack, opaque modules, TorchScript boxes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import nn

__all__ = ["hooked"]


class _Visitor(Protocol):
    def enter(self, fqn: str, module: nn.Module, args: Any, kwargs: Any) -> None: ...

    def leave(self, fqn: str, module: nn.Module, args: Any, kwargs: Any, out: Any) -> None: ...


class _Box(nn.Module):
    """Temporary wrapper giving a TorchScript module Python hooks during the trace."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)


@contextlib.contextmanager
def hooked(model: nn.Module, tracer: _Visitor) -> Iterator[None]:
    """Hook every module (boxing TorchScript ones), and undo all of it afterwards."""
    boxed: list[tuple[str, nn.Module, str]] = []
    for fqn, module in list(model.named_modules()):
        if fqn and isinstance(module, torch.jit.ScriptModule) and not any(
                fqn.startswith(b + ".") for b, _, _ in boxed):
            parent_fqn, _, child = fqn.rpartition(".")
            parent = model.get_submodule(parent_fqn)
            boxed.append((fqn, parent, child))
            setattr(parent, child, _Box(module))
    handles = []
    try:
        for fqn, module in model.named_modules():
            if isinstance(module, torch.jit.ScriptModule):
                continue
            handles.append(module.register_forward_pre_hook(
                lambda m, a, k, f=fqn: tracer.enter(f, m, a, k), with_kwargs=True))
            handles.append(module.register_forward_hook(
                lambda m, a, k, o, f=fqn: tracer.leave(f, m, a, k, o), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for _, parent, child in reversed(boxed):
            setattr(parent, child, getattr(parent, child).inner)
