"""The table from operation name to labelling rule, and the rules that join or split tensors."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from torchslim.pruning.structured._elements import Labels
from torchslim.pruning.structured._ops import (
    MODULE_RULES,
    Rule,
    broadcast,
    couple,
    elementwise,
    first_only,
    no_labels,
    opaque,
    reduction,
    spatial,
    union_dim,
)
from torchslim.pruning.structured._shape import Call, State, follow_shape

__all__ = ["RULES", "op_name", "rule_for"]


def _matmul(st: State, call: Call) -> None:
    a, b = call.args[0], call.args[1]
    if call.name == "rmatmul":
        a, b = b, a
    labels = _matmul_labels(st, a, b, call.out)
    if labels is None:
        opaque(st, call)
    else:
        st.set(call.out, labels)


def _addmm(st: State, call: Call) -> None:
    bias, a, b = call.args[0], call.args[1], call.args[2]
    labels = _matmul_labels(st, a, b, call.out)
    if labels is None:
        opaque(st, call)
        return
    shape = tuple(call.out.shape)
    st.set(call.out, broadcast(st, [(shape, labels), (tuple(bias.shape), st.get(bias))], shape))


def _matmul_labels(st: State, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> Labels | None:
    if a.dim() < 2 or b.dim() < 2:
        return None
    la, lb = st.get(a), st.get(b)
    couple(st, la.get(a.dim() - 1), lb.get(b.dim() - 2))  # the contracted dim
    batch = [(tuple(t.shape[:-2]), {d: v for d, v in lab.items() if d < t.dim() - 2})
             for t, lab in ((a, la), (b, lb))]
    labels = broadcast(st, batch, tuple(out.shape[:-2]))
    if a.dim() - 2 in la:
        labels[out.dim() - 2] = la[a.dim() - 2]
    if b.dim() - 1 in lb:
        labels[out.dim() - 1] = lb[b.dim() - 1]
    return labels


def _attention(st: State, call: Call) -> None:
    q, k, v = call.args[:3]
    if min(q.dim(), k.dim(), v.dim()) < 2:
        opaque(st, call)
        return
    lq, lk, lv = st.get(q), st.get(k), st.get(v)
    couple(st, lq.get(q.dim() - 1), lk.get(k.dim() - 1))  # q . k over the head dim
    couple(st, lk.get(k.dim() - 2), lv.get(v.dim() - 2))  # keys and values share positions
    for t in (*call.args[3:], *call.kwargs.values()):
        if isinstance(t, torch.Tensor):
            st.el.fix_labels(st.get(t))
    out = call.out
    batch = [(tuple(t.shape[:-2]), {d: x for d, x in lab.items() if d < t.dim() - 2})
             for t, lab in ((q, lq), (k, lk), (v, lv))]
    labels = broadcast(st, batch, tuple(out.shape[:-2]))
    if q.dim() - 2 in lq:
        labels[out.dim() - 2] = lq[q.dim() - 2]
    if v.dim() - 1 in lv:
        labels[out.dim() - 1] = lv[v.dim() - 1]
    st.set(out, labels)


def _dim_arg(call: Call, pos: int, default: int = 0) -> int:
    value = call.args[pos] if len(call.args) > pos else call.kwargs.get("dim", default)
    return int(value)


def _cat(st: State, call: Call) -> None:
    parts = [t for t in call.args[0] if not (t.dim() == 1 and t.numel() == 0)]  # legacy empty
    out = call.out
    d = _dim_arg(call, 1) % out.dim()
    labs = [st.get(t) for t in parts]
    labels: Labels = {}
    if any(d in lab for lab in labs):  # channels of each part follow one another
        labels[d] = np.concatenate([lab[d] if d in lab else st.el.fixed(t.shape[d])
                                    for t, lab in zip(parts, labs)])
    for k in range(out.dim()):
        if k != d and out.shape[k] > 1:
            vec = union_dim(st, [lab.get(k) for lab in labs])
            if vec is not None:
                labels[k] = vec
    st.set(out, labels)


def _stack(st: State, call: Call) -> None:
    parts, out = list(call.args[0]), call.out
    d = _dim_arg(call, 1) % out.dim()
    labs = [st.get(t) for t in parts]
    labels: Labels = {}
    for j in range(parts[0].dim()):
        vec = union_dim(st, [lab.get(j) for lab in labs])
        if vec is not None:
            labels[j if j < d else j + 1] = vec
    st.set(out, labels)


def _chunk(st: State, call: Call) -> None:
    x, outs = call.args[0], list(call.out)
    d = _dim_arg(call, 2) % x.dim()
    lx = st.get(x)
    if d in lx and x.shape[d] % len(outs) == 0 and len(outs) == int(call.args[1]):
        per = x.shape[d] // len(outs)
        for local in range(per):  # chunks stay equal: local channel l goes from all or none
            st.el.union_all(lx[d][local::per])
        for i, o in enumerate(outs):
            st.set(o, {**lx, d: lx[d][i * per:(i + 1) * per]})
        return
    _split(st, call)


def _split(st: State, call: Call) -> None:
    x, outs = call.args[0], list(call.out)
    d = _dim_arg(call, 1 if call.name == "unbind" else 2) % x.dim()
    lx = st.get(x)
    if d in lx:
        st.el.fix(lx[d])  # split sizes are plain integers: keep the split dim
    drop = call.name == "unbind"
    for o in outs:
        st.set(o, {(k - 1 if drop and k > d else k): v for k, v in lx.items() if k != d})


def _setitem(st: State, call: Call) -> None:
    opaque(st, call)


def _shape(st: State, call: Call) -> None:
    name = str(getattr(call.func, "__name__", ""))
    in_place = name.endswith("_") and not name.endswith("__")  # unsqueeze_ (not __getitem__): x changed
    if in_place or not isinstance(call.args[0], torch.Tensor) or not isinstance(call.out, torch.Tensor):
        opaque(st, call)
    else:
        follow_shape(st, call)


_ELEMENTWISE = """
abs absolute acos acosh add addcdiv addcmul alpha_dropout and asin asinh atan atan2 atanh bitwise_and
bitwise_not bitwise_or bitwise_xor ceil celu clamp clamp_max clamp_min clip clone contiguous copy
copysign cos cosh cpu cuda cumprod cumsum deg2rad detach div divide double dropout dropout1d dropout2d
dropout3d elu empty_like eq erf erfc exp exp2 expm1 feature_alpha_dropout fill float floor floor_divide
floordiv fmax fmin fmod frac full_like ge gelu gt half hardshrink hardsigmoid hardswish hardtanh
heaviside hypot invert isfinite isinf isnan le leaky_relu lerp lgamma log log10 log1p log2 log_sigmoid
log_softmax logical_and logical_not logical_or logical_xor logit logsigmoid lt masked_fill maximum
minimum mish mod mul multiply nan_to_num ne neg negative normalize ones_like or pos pow rad2deg rand_like
randn_like reciprocal relu relu6 remainder round rrelu rsqrt rsub selu sigmoid sign signbit silu sin sinc
sinh softmax softmin softplus softshrink softsign sqrt square sub subtract tan tanh tanhshrink threshold
true_divide truediv trunc where xlogy xor zero zeros_like float_power logaddexp local_response_norm
bernoulli requires_grad to bfloat16 int long bool data real
"""
_REDUCTION = """
all amax amin aminmax any argmax argmin count_nonzero logsumexp max mean median min nanmean nanmedian
nansum norm prod std std_mean sum var var_mean
"""
_SPATIAL = """
adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d
adaptive_max_pool3d avg_pool1d avg_pool2d avg_pool3d lp_pool1d lp_pool2d lp_pool3d max_pool1d max_pool2d
max_pool3d max_pool1d_with_indices max_pool2d_with_indices max_pool3d_with_indices interpolate upsample
upsample_nearest upsample_bilinear fractional_max_pool2d fractional_max_pool3d
"""
_SHAPE = """
view reshape flatten unflatten permute transpose t T mT movedim moveaxis swapaxes swapdims squeeze
unsqueeze expand broadcast_to repeat tile flip fliplr flipud roll narrow select getitem index_select
repeat_interleave pixel_shuffle pixel_unshuffle channel_shuffle native_channel_shuffle pad unfold
view_as reshape_as
"""
_NO_LABELS = "new_zeros new_ones new_empty new_full new_tensor"

RULES: dict[str, Rule] = {
    **dict.fromkeys(_ELEMENTWISE.split(), elementwise), **dict.fromkeys(_REDUCTION.split(), reduction),
    **dict.fromkeys(_SPATIAL.split(), spatial), **dict.fromkeys(_SHAPE.split(), _shape),
    **dict.fromkeys(_NO_LABELS.split(), no_labels), **MODULE_RULES,
    "type_as": first_only, "expand_as": elementwise, "matmul": _matmul, "mm": _matmul, "bmm": _matmul,
    "rmatmul": _matmul, "addmm": _addmm, "baddbmm": _addmm, "scaled_dot_product_attention": _attention,
    "cat": _cat, "concat": _cat, "concatenate": _cat, "stack": _stack, "chunk": _chunk, "split": _split,
    "tensor_split": _split, "split_with_sizes": _split, "unbind": _split, "setitem": _setitem,
}
_REVERSED = {"radd", "rsub", "rmul", "rdiv", "rtruediv", "rfloordiv", "rpow", "rmod", "rand", "ror", "rxor"}


def op_name(func: Any) -> str:
    """A torch function's plain name: ``Tensor.__iadd__`` -> ``add``, ``relu_`` -> ``relu``."""
    name = str(getattr(func, "__name__", ""))
    if name == "__get__":  # a property such as Tensor.T
        name = str(getattr(getattr(func, "__self__", None), "__name__", name))
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
        if name.startswith("i") and name[1:] in RULES:
            return name[1:]
        if name in _REVERSED:
            return "sub" if name == "rsub" else name[1:]
        return name
    if name.endswith("_") and not name.startswith("_"):
        return name[:-1]
    return name


def rule_for(name: str) -> Rule:
    """The labelling rule of an operation; ``opaque`` when none is known."""
    return RULES.get(name, opaque)
