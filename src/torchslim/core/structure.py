"""Describe changed modules as plain data and rebuild them: the basis of save/load and resume.

Only classes in an explicit allow-list can be rebuilt, so reading ``structure.json`` never
imports or executes anything named in the file.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
from torch import nn

from torchslim.errors import OutputError

__all__ = ["capture", "keep_children", "module_spec", "rebuildable", "replay", "set_config", "tie_modules"]

T = TypeVar("T", bound=type[nn.Module])
_SIMPLE = (int, float, str, bool, type(None))


def _conv(m: Any) -> dict[str, Any]:
    return {
        "in_channels": m.in_channels, "out_channels": m.out_channels,
        "kernel_size": list(m.kernel_size), "stride": list(m.stride),
        "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
        "dilation": list(m.dilation), "groups": m.groups, "bias": m.bias is not None,
        "padding_mode": m.padding_mode,
    }


def _norm(m: Any) -> dict[str, Any]:
    return {"num_features": m.num_features, "eps": m.eps, "momentum": m.momentum,
            "affine": m.affine, "track_running_stats": m.track_running_stats}


_BUILDERS: dict[str, tuple[type[nn.Module], Callable[[Any], dict[str, Any]]]] = {
    "Linear": (nn.Linear, lambda m: {"in_features": m.in_features, "out_features": m.out_features,
                                     "bias": m.bias is not None}),
    "Conv1d": (nn.Conv1d, _conv),
    "Conv2d": (nn.Conv2d, _conv),
    "BatchNorm1d": (nn.BatchNorm1d, _norm),
    "BatchNorm2d": (nn.BatchNorm2d, _norm),
    "LayerNorm": (nn.LayerNorm, lambda m: {"normalized_shape": list(m.normalized_shape),
                                           "eps": m.eps, "elementwise_affine": m.elementwise_affine,
                                           "bias": getattr(m, "bias", None) is not None}),
    "Embedding": (nn.Embedding, lambda m: {"num_embeddings": m.num_embeddings,
                                           "embedding_dim": m.embedding_dim,
                                           "padding_idx": m.padding_idx}),
    "Identity": (nn.Identity, lambda m: {}),
}


def rebuildable(cls: T) -> T:
    """Allow ``cls`` in structure.json; it must define ``spec_kwargs() -> dict``."""
    key = f"torchslim:{cls.__name__}"
    if key in _BUILDERS and _BUILDERS[key][0] is not cls:
        raise RuntimeError(f"two rebuildable classes are named {cls.__name__}")
    _BUILDERS[key] = (cls, lambda m: m.spec_kwargs())
    return cls


def _key_of(module: nn.Module) -> str:
    for key, (cls, _) in _BUILDERS.items():
        if type(module) is cls:
            return key
    raise OutputError(
        f"cannot record a {type(module).__name__} in structure.json: only "
        f"{', '.join(sorted(k.split(':')[-1] for k in _BUILDERS))} can be rebuilt"
    )


def module_spec(module: nn.Module, attrs: Iterable[str] = ()) -> dict[str, Any]:
    """Plain-data description of ``module`` (class, constructor arguments, simple attrs)."""
    key = _key_of(module)
    spec: dict[str, Any] = {"cls": key, "kwargs": _BUILDERS[key][1](module)}
    tensor = next(iter(module.parameters(recurse=False)), None)
    if tensor is not None:
        spec["dtype"] = str(tensor.dtype).removeprefix("torch.")
    if attrs:
        spec["attrs"] = {a: getattr(module, a) for a in attrs}
    return spec


def capture(model: nn.Module, changes: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Ops that turn a freshly built base model into ``model``'s architecture.

    ``changes`` maps fqn -> {"attrs": [names]} (attributes to record) or {} (swap the module),
    or {"keep": [indices]} (a ModuleList / Sequential reduced to those children, in order).
    With ``"keep_module": True`` the module stays; ``"params": [names]`` then records the shapes
    of those tensors so ``replay`` can resize them (channels cut from any module type).
    ``"tie": [fqns]`` makes those modules share ``fqn``'s parameters (see ``tie_modules``); with
    ``"keep_module": True`` and nothing else to record, only the tie is recorded (no swap).
    ``{"wrap": True}`` records a wrapper module (a rebuildable class with ``wraps_inner`` and an
    ``inner`` child) placed around the module that was at ``fqn``: ``replay`` builds the wrapper
    and moves the base model's module into it, so the wrapped class need not be rebuildable.
    ``"config": {name: int}`` on the root fqn ``""`` records Hugging Face config sizes the
    change set (``hidden_size`` after the residual stream was cut; see ``set_config``).
    Parents come before children; fqns that no longer exist are dropped; ties come last, after
    every swap, so they bind the final modules.
    """
    present = dict(model.named_modules())
    ops = []
    last = []  # ties and the root's config op, after every swap
    for fqn in sorted(changes, key=lambda f: (f.count("."), f)):
        if fqn not in present:
            continue
        if not fqn and "config" in changes[fqn]:
            last.append({"fqn": fqn, "config": dict(changes[fqn]["config"])})
            if not changes[fqn].keys() - {"config", "keep_module"}:
                continue
        if "tie" in changes[fqn]:
            tied = [t for t in changes[fqn]["tie"] if t in present]
            if tied:
                last.append({"fqn": fqn, "tie": tied})
            if changes[fqn].get("keep_module", False) and not changes[fqn].keys() & {"attrs", "params"}:
                continue
        if changes[fqn].get("wrap", False):
            ops.append({"fqn": fqn, "wrap": module_spec(present[fqn])})
            continue
        if "keep" in changes[fqn]:
            kept: dict[str, Any] = {"fqn": fqn, "keep": [int(i) for i in changes[fqn]["keep"]]}
            ops.append(kept)
            continue
        names = changes[fqn].get("attrs", ())
        params = changes[fqn].get("params", ())
        if (names or params) and changes[fqn].get("keep_module", False):
            op: dict[str, Any] = {"fqn": fqn, "attrs": {a: _plain(getattr(present[fqn], a)) for a in names}}
            if params:
                op["shapes"] = {n: list(getattr(present[fqn], n).shape) for n in params}
            ops.append(op)
        else:
            ops.append({"fqn": fqn, "module": module_spec(present[fqn], names)})
    return ops + last


MAX_ELEMENTS = 2**31  # per module or tensor: above any model here (8 GB in fp32), below a corrupt size


def _build(spec: Any, where: str) -> nn.Module:
    if not isinstance(spec, dict) or not isinstance(spec.get("cls"), str) or spec["cls"] not in _BUILDERS:
        raise OutputError(f"{where}: unknown module class {spec!r} in structure.json")
    cls, _ = _BUILDERS[spec["cls"]]
    kwargs = spec.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise OutputError(f"{where}: 'kwargs' must be a mapping, found {kwargs!r}")
    kwargs = {k: tuple(v) if isinstance(v, list) and k != "normalized_shape" else v
              for k, v in kwargs.items()}
    try:
        with torch.device("meta"):  # count the elements before allocating anything
            numel = sum(t.numel() for t in (*cls(**kwargs).parameters(), *cls(**kwargs).buffers()))
    except Exception:  # noqa: BLE001 -- a class that cannot be built on meta is built for real below
        numel = 0
    if numel > MAX_ELEMENTS:
        raise OutputError(f"{where}: {spec['cls']}({kwargs}) would hold {numel:,} elements; "
                          f"expected at most {MAX_ELEMENTS:,} (a corrupt structure.json?)")
    try:
        module = cls(**kwargs)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise OutputError(f"{where}: cannot build {spec['cls']}({kwargs}): {exc}") from exc
    dtype = getattr(torch, str(spec.get("dtype", "float32")), None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        module.to(dtype)
    return module


def replay(model: nn.Module, ops: Any) -> nn.Module:
    """Apply ``capture``'s ops to a freshly built base model, in place."""
    if not isinstance(ops, list):
        raise OutputError(f"structure.json: 'ops' must be a list, found {type(ops).__name__}")
    for i, op in enumerate(ops):
        where = f"structure.json ops[{i}]"
        named = isinstance(op, dict) and isinstance(op.get("fqn"), str) and bool(
            op["fqn"] or "shapes" in op or "config" in op)
        if not named:
            raise OutputError(f"{where}: expected a mapping with a non-empty 'fqn', found {op!r}")
        fqn = op["fqn"]
        if "config" in op:
            if fqn:
                raise OutputError(f"{where}: 'config' belongs to the root (fqn ''), found fqn {fqn!r}")
            set_config(model, op["config"], where)
            continue
        if "keep" in op:
            keep_children(model, fqn, op["keep"], where)
            continue
        if "tie" in op:
            tie_modules(model, fqn, op["tie"], where)
            continue
        if not fqn and "module" not in op:  # the root keeps its class; its own tensors may resize
            _resize(model, op["shapes"], where)
            _set_attrs(model, op.get("attrs", {}), where)
            continue
        parent_fqn, _, child = fqn.rpartition(".")
        try:
            parent = model.get_submodule(parent_fqn)
        except AttributeError as exc:
            raise OutputError(f"{where}: the model has no module {parent_fqn!r}") from exc
        if not isinstance(getattr(parent, child, None), nn.Module):
            raise OutputError(f"{where}: the model has no module {fqn!r} (built from another base model?)")
        if "wrap" in op:
            wrapper = _build(op["wrap"], where)
            if not getattr(wrapper, "wraps_inner", False):
                raise OutputError(f"{where}: {op['wrap'].get('cls')!r} is not a wrapper module; 'wrap' "
                                  "expects one (e.g. torchslim:RoundedOutput)")
            wrapper.inner = getattr(parent, child)
            setattr(parent, child, wrapper)
            continue
        if "module" in op:
            setattr(parent, child, _build(op["module"], where))
        _resize(getattr(parent, child), op.get("shapes", {}), where)
        attrs = op.get("attrs", op.get("module", {}).get("attrs", {}))
        _set_attrs(getattr(parent, child), attrs, where)
    return model


def keep_children(model: nn.Module, fqn: str, keep: Any, where: str = "keep_children") -> nn.Module:
    """Reduce the ModuleList / Sequential ``fqn`` to the children at indices ``keep`` (in order).

    Hugging Face bookkeeping follows: ``layer_idx`` attributes inside the kept children are
    renumbered, and a ``config.num_hidden_layers`` equal to the old length is set to the new one.
    """
    if not fqn:
        raise OutputError(f"{where}: 'keep' needs the name of a ModuleList or Sequential inside the model")
    parent_fqn, _, child = fqn.rpartition(".")
    try:
        parent, stack = model.get_submodule(parent_fqn), model.get_submodule(fqn)
    except AttributeError as exc:
        raise OutputError(f"{where}: the model has no module {fqn!r}") from exc
    if type(stack) not in (nn.ModuleList, nn.Sequential):  # a subclass may have its own forward
        raise OutputError(f"{where}: {fqn!r} is a {type(stack).__name__}, "
                          "expected a ModuleList or Sequential")
    assert isinstance(stack, (nn.ModuleList, nn.Sequential))
    valid = isinstance(keep, list) and keep and all(isinstance(i, int) for i in keep)
    if not valid or sorted(set(keep)) != keep or keep[0] < 0 or keep[-1] >= len(stack):
        raise OutputError(f"{where}: 'keep' must be increasing indices into the {len(stack)} children of "
                          f"{fqn!r}, found {keep!r}")
    old = len(stack)
    children = [stack[i] for i in keep]
    shorter = nn.Sequential(*children) if type(stack) is nn.Sequential else nn.ModuleList(children)
    setattr(parent, child, shorter)
    for new_index, block in enumerate(children):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "num_hidden_layers", None) == old:
            config.num_hidden_layers = len(keep)
    return model


def tie_modules(model: nn.Module, fqn: str, targets: Any, where: str = "tie_modules") -> nn.Module:
    """Make each module in ``targets`` use ``fqn``'s parameters: the same objects, by relative name.

    Every parameter of the source (``fqn``) must exist in each target under the same name, with
    the same shape and dtype; a target may hold more (a head's bias). Buffers stay per module.
    Sources and targets must be distinct, non-nested modules inside the model.
    """
    names = targets if isinstance(targets, list) else []
    distinct = len(set(map(str, names))) == len(names) and all(isinstance(t, str) and t for t in names)
    if not fqn or not names or not distinct:
        raise OutputError(f"{where}: 'tie' must name a module and list distinct other modules that share "
                          f"its parameters, found fqn={fqn!r}, tie={targets!r}")
    for name in names:
        if name == fqn or name.startswith(f"{fqn}.") or fqn.startswith(f"{name}."):
            raise OutputError(f"{where}: cannot tie {name!r} to {fqn!r}: one contains the other")
    source = _module_at(model, fqn, where)
    params = list(source.named_parameters(remove_duplicate=False))
    if not params:
        raise OutputError(f"{where}: {fqn!r} ({type(source).__name__}) has no parameters to share")
    targets = [_module_at(model, name, where) for name in names]
    for name, target in zip(names, targets, strict=True):  # check everything before changing anything
        for pname, param in params:
            try:
                old = target.get_parameter(pname)
            except AttributeError as exc:
                raise OutputError(f"{where}: {name!r} ({type(target).__name__}) has no parameter {pname!r} "
                                  f"to tie to {fqn}.{pname}") from exc
            if old.shape != param.shape or old.dtype != param.dtype:
                raise OutputError(f"{where}: cannot tie {name}.{pname} {list(old.shape)} {old.dtype} to "
                                  f"{fqn}.{pname} {list(param.shape)} {param.dtype}")
    for target in targets:
        for pname, param in params:
            owner, _, leaf = pname.rpartition(".")
            setattr(target.get_submodule(owner), leaf, param)
    return model


def set_config(model: nn.Module, sizes: Any, where: str = "set_config") -> nn.Module:
    """Set integer sizes (``hidden_size``) on the Hugging Face configs inside ``model``.

    Nested models share or copy one config: the first config found (the outermost model's)
    that holds the name as an int is set, and so is every other holding the same value (a
    copy; a sub-model of another size, e.g. a vision tower, keeps its own). A name no config
    holds as an int is refused, so a file cannot plant new attributes.
    """
    valid = isinstance(sizes, dict) and bool(sizes) and all(
        isinstance(k, str) and type(v) is int and v > 0 for k, v in sizes.items())
    if not valid:
        raise OutputError(f"{where}: 'config' must map config names to positive integers, found {sizes!r}")
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}
    for name, value in sizes.items():
        holders = [c for c in configs.values() if type(getattr(c, name, None)) is int]
        if not holders:
            raise OutputError(f"{where}: the model has no config with an integer {name!r} to set to {value}")
        held = getattr(holders[0], name)
        for config in holders:
            if getattr(config, name) == held:
                setattr(config, name, value)
    return model


def _module_at(model: nn.Module, fqn: str, where: str) -> nn.Module:
    try:
        return model.get_submodule(fqn)
    except AttributeError as exc:
        raise OutputError(f"{where}: the model has no module {fqn!r}") from exc


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _is_simple(target: nn.Module, name: str, value: Any) -> bool:
    """A number or string; a list only where the module holds a tuple (``normalized_shape``)."""
    if isinstance(value, list):
        return isinstance(getattr(target, name, None), tuple) and all(isinstance(v, _SIMPLE) for v in value)
    return isinstance(value, _SIMPLE)


def _resize(target: nn.Module, shapes: Any, where: str) -> None:
    """Replace tensors by uninitialised ones of the recorded shapes (weights load afterwards)."""
    if not isinstance(shapes, dict):
        raise OutputError(f"{where}: 'shapes' must map tensor names to shapes, found {shapes!r}")
    for name, shape in shapes.items():
        old = getattr(target, name, None) if isinstance(name, str) else None
        valid = (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)  # not bool
                 and math.prod(shape) <= MAX_ELEMENTS)
        if not isinstance(old, torch.Tensor) or not valid:
            raise OutputError(f"{where}: cannot resize {name!r} of {type(target).__name__} to {shape!r}")
        new = torch.empty(shape, dtype=old.dtype, device=old.device)
        if isinstance(old, nn.Parameter):
            setattr(target, name, nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            target._buffers[name] = new


def _set_attrs(target: nn.Module, attrs: Any, where: str) -> None:
    if not isinstance(attrs, dict) or not all(_is_simple(target, str(k), v) for k, v in attrs.items()):
        raise OutputError(f"{where}: 'attrs' must map names to numbers or strings, found {attrs!r}")
    for name, value in attrs.items():
        if name.startswith("__"):
            raise OutputError(f"{where}: attribute {name!r} cannot be set from structure.json")
        try:
            setattr(target, name, tuple(value) if isinstance(value, list) else value)
        except (TypeError, AttributeError, ValueError) as exc:
            raise OutputError(f"{where}: cannot set {name}={value!r} on "
                              f"{type(target).__name__}: {exc}") from exc
