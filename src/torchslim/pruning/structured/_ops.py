"""Labelling rules: how each torch operation couples the channels of its inputs and outputs.

A rule reads the input labels (``st.get``), unions elements that must be removed together and
sets the output labels (``st.set``). An operation without a rule is opaque: every channel
flowing into it is kept, and its outputs carry no prunable channels.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from torchslim.pruning.structured._elements import Labels
from torchslim.pruning.structured._shape import Call, State

__all__ = [
    "MODULE_RULES", "Rule", "broadcast", "couple", "elementwise", "first_only", "no_labels", "opaque",
    "reduction", "spatial", "tensors", "union_dim",
]

Rule = Callable[[State, Call], None]


def tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a (nested) argument or result."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from tensors(item)


def opaque(st: State, call: Call) -> None:
    """Keep every channel that reaches an operation we cannot follow."""
    for t in tensors((call.args, call.kwargs)):
        st.el.fix_labels(st.get(t))
    for t in tensors(call.out):
        st.set(t, {})


def couple(st: State, a: np.ndarray | None, b: np.ndarray | None) -> None:
    """Couple two position vectors of one dim; a missing vector is a dim that must stay."""
    if a is not None and b is not None:
        st.el.union_vectors(a, b)
    elif a is not None:
        st.el.fix(a)
    elif b is not None:
        st.el.fix(b)


def union_dim(st: State, vecs: Sequence[np.ndarray | None]) -> np.ndarray | None:
    """Union same-length vectors (None = must stay); the shared vector or None."""
    ref = next((v for v in vecs if v is not None), None)
    if ref is not None:
        for v in vecs:
            couple(st, ref, v)
    return ref


def broadcast(st: State, operands: Sequence[tuple[Sequence[int], Labels]], shape: Sequence[int]) -> Labels:
    """Labels of an element-wise result; operands broadcast along a dim are not coupled there."""
    n, out = len(shape), {}
    for k in range(n):
        if shape[k] <= 1:
            continue
        vecs = [lab.get(k - (n - len(s))) for s, lab in operands
                if k - (n - len(s)) >= 0 and s[k - (n - len(s))] == shape[k]]
        if any(v is not None for v in vecs):
            out[k] = union_dim(st, vecs)
    return {k: v for k, v in out.items() if v is not None}


def elementwise(st: State, call: Call) -> None:
    operands = [(tuple(t.shape), st.get(t)) for t in tensors((call.args, call.kwargs))]
    for o in tensors(call.out):
        st.set(o, broadcast(st, operands, tuple(o.shape)))


def first_only(st: State, call: Call) -> None:
    labels = st.get(call.args[0])
    for o in tensors(call.out):
        st.set(o, dict(labels) if o.shape == call.args[0].shape else {})


def no_labels(st: State, call: Call) -> None:
    for o in tensors(call.out):
        st.set(o, {})


def _dims(value: Any, ndim: int) -> set[int] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return {value % ndim}
    if isinstance(value, (tuple, list)) and value and all(isinstance(d, int) for d in value):
        return {d % ndim for d in value}
    return None


def reduction(st: State, call: Call) -> None:
    x = call.args[0]
    if len(call.args) > 1 and isinstance(call.args[1], torch.Tensor):
        elementwise(st, call)  # max(a, b), min(a, b)
        return
    raw = call.kwargs.get("dim", call.kwargs.get("axis"))
    if raw is None and call.name == "norm":
        raw = call.args[2] if len(call.args) > 2 else None
    elif raw is None and len(call.args) > 1:
        raw = call.args[1]
    reduced = _dims(raw, max(x.dim(), 1)) or set(range(x.dim()))
    lx = st.get(x)
    for o in tensors(call.out):
        keep = o.dim() == x.dim()
        st.set(o, {(d if keep else d - sum(r < d for r in reduced)): v
                   for d, v in lx.items() if d not in reduced})


def spatial(st: State, call: Call) -> None:
    x = call.args[0]
    digits = re.search(r"([123])d", call.name)
    first = x.dim() - (int(digits.group(1)) if digits else x.dim() - 2)
    lx = st.get(x)
    for d, v in lx.items():
        if d >= first:
            st.el.fix(v)
    for o in tensors(call.out):
        st.set(o, {d: v for d, v in lx.items() if d < first})


def _linear(st: State, call: Call) -> None:
    x, w = call.args[0], call.args[1]
    b = call.args[2] if len(call.args) > 2 else call.kwargs.get("bias")
    if w.dim() != 2:
        opaque(st, call)
        return
    lx, lw = st.get(x), st.get(w)
    last = x.dim() - 1
    couple(st, lx.get(last), lw.get(1))
    out = {d: v for d, v in lx.items() if d != last}
    if 0 in lw:
        out[last] = lw[0]
    if isinstance(b, torch.Tensor):
        couple(st, st.get(b).get(0), lw.get(0))
    st.set(call.out, out)


def _conv_args(call: Call) -> tuple[torch.Tensor, torch.Tensor, Any, int, int]:
    x, w = call.args[0], call.args[1]
    b = call.args[2] if len(call.args) > 2 else call.kwargs.get("bias")
    groups = call.args[6] if len(call.args) > 6 else call.kwargs.get("groups", 1)  # same slot in both
    return x, w, b, int(groups), 1 if x.dim() == w.dim() else 0


def _conv(st: State, call: Call) -> None:
    x, w, b, g, cd = _conv_args(call)
    lx, lw = st.get(x), st.get(w)
    for d, v in lx.items():
        if d not in (0, cd):
            st.el.fix(v)  # spatial positions never shrink
    for d, v in lw.items():
        if d >= 2:
            st.el.fix(v)
    w_out = lw.get(0)
    if g == 1:
        couple(st, lx.get(cd), lw.get(1))
    else:  # a group's input and output channels are removed together, as one unit
        if 1 in lw:
            st.el.fix(lw[1])
        xv = lx[cd] if cd in lx else st.el.fixed(x.shape[cd])
        wv = w_out if w_out is not None else st.el.fixed(w.shape[0])
        kin, kout = x.shape[cd] // g, w.shape[0] // g
        for gi in range(g):
            st.el.union_all(np.concatenate([xv[gi * kin:(gi + 1) * kin], wv[gi * kout:(gi + 1) * kout]]))
    out: Labels = {0: lx[0]} if cd == 1 and 0 in lx else {}
    if w_out is not None:
        out[cd] = w_out
    if isinstance(b, torch.Tensor):
        couple(st, st.get(b).get(0), w_out)
    st.set(call.out, out)


def _conv_transpose(st: State, call: Call) -> None:
    x, w, b, g, cd = _conv_args(call)
    if g != 1:
        opaque(st, call)
        return
    lx, lw = st.get(x), st.get(w)
    for d, v in lx.items():
        if d not in (0, cd):
            st.el.fix(v)
    for d in range(2, w.dim()):
        if d in lw:
            st.el.fix(lw[d])
    couple(st, lx.get(cd), lw.get(0))
    out: Labels = {0: lx[0]} if cd == 1 and 0 in lx else {}
    if 1 in lw:
        out[cd] = lw[1]
    if isinstance(b, torch.Tensor):
        couple(st, st.get(b).get(0), lw.get(1))
    st.set(call.out, out)


def _per_channel(st: State, call: Call, extra: Sequence[Any]) -> None:
    """Normalization-like op on dim 1: every per-channel tensor in ``extra`` is coupled."""
    x = call.args[0]
    lx = dict(st.get(x))
    for t in extra:
        if isinstance(t, torch.Tensor) and t.dim() == 1 and t.numel() > 1:
            lx[1] = union_dim(st, [lx.get(1), st.get(t).get(0)])  # type: ignore[assignment]
    st.set(call.out, {d: v for d, v in lx.items() if v is not None})


def _batch_norm(st: State, call: Call) -> None:
    names = ("running_mean", "running_var", "weight", "bias")
    extra = [*call.args[1:5], *(call.kwargs.get(n) for n in names)]
    _per_channel(st, call, extra)


def _prelu(st: State, call: Call) -> None:
    _per_channel(st, call, [call.args[1] if len(call.args) > 1 else call.kwargs.get("weight")])


def _layer_norm(st: State, call: Call) -> None:
    x, shape = call.args[0], tuple(call.args[1])
    w = call.args[2] if len(call.args) > 2 else call.kwargs.get("weight")
    b = call.args[3] if len(call.args) > 3 else call.kwargs.get("bias")
    lx = dict(st.get(x))
    params = [t for t in (w, b) if isinstance(t, torch.Tensor)]
    last = x.dim() - 1
    if len(shape) != 1 or w is None:  # the size is baked into the call: keep it
        for d in range(x.dim() - len(shape), x.dim()):
            if d in lx:
                st.el.fix(lx[d])
        for t in params:
            st.el.fix_labels(st.get(t))
    else:
        vec = union_dim(st, [lx.get(last), *(st.get(t).get(0) for t in params)])
        if vec is not None:
            lx[last] = vec
    st.set(call.out, lx)


def _group_norm(st: State, call: Call) -> None:
    x, groups = call.args[0], int(call.args[1])
    lx = st.get(x)
    if 1 in lx:
        per = x.shape[1] // groups
        for local in range(per):  # removing local channel l in every group keeps groups intact
            st.el.union_all(lx[1][local::per])
    w = call.args[2] if len(call.args) > 2 else call.kwargs.get("weight")
    b = call.args[3] if len(call.args) > 3 else call.kwargs.get("bias")
    _per_channel(st, call, [w, b])


def _embedding(st: State, call: Call) -> None:
    idx, w = call.args[0], call.args[1]
    if idx.is_floating_point():  # torch.embedding(weight, indices) puts the table first
        idx, w = w, idx
    lw = st.get(w)
    if 0 in lw:
        st.el.fix(lw[0])  # rows are addressed by token ids
    out = dict(st.get(idx))
    if 1 in lw:
        out[idx.dim()] = lw[1]
    st.set(call.out, out)


MODULE_RULES: dict[str, Rule] = {
    "linear": _linear, "conv1d": _conv, "conv2d": _conv, "conv3d": _conv,
    "conv_transpose1d": _conv_transpose, "conv_transpose2d": _conv_transpose,
    "conv_transpose3d": _conv_transpose, "batch_norm": _batch_norm, "instance_norm": _batch_norm,
    "layer_norm": _layer_norm, "group_norm": _group_norm, "embedding": _embedding, "prelu": _prelu,
}
