"""Channel labels through shape operations (view, permute, flatten, indexing, pad ...).

Instead of one rule per operation, the operation is run again on a tensor holding each
position's flat index: the result shows, for every output position, which input position it
came from. A labelled input dim may continue as one output dim (possibly repeated, flipped or
padded); anything else (a split into two dims, a partial slice) keeps that dim's channels.
Because shape arguments are plain integers, a hard-coded size (``x.view(n, 768, -1)``) looks
like a computed one; so the operation is also re-run with one channel removed, and the dim is
pruned only if the result is the original result with that channel's positions removed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import numpy as np
import torch

from torchslim.pruning.structured._elements import FIXED, Elements, Labels

__all__ = ["Call", "State", "follow_shape"]


class State(Protocol):
    """What a labelling rule needs from the tracer."""

    el: Elements

    def get(self, t: torch.Tensor) -> Labels: ...

    def set(self, t: torch.Tensor, labels: Labels) -> None: ...


@dataclasses.dataclass
class Call:
    """One intercepted call: its normalized name, the function, its arguments and result."""

    name: str
    func: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    out: Any


def _rerun(call: Call, x: torch.Tensor) -> Any:
    return call.func(x, *call.args[1:], **call.kwargs)


def follow_shape(st: State, call: Call) -> None:
    """Label the output of a single-input shape operation from its input's labels."""
    x, out = call.args[0], call.out
    lx = st.get(x)
    if not lx:
        return
    idx = torch.arange(1, x.numel() + 1, device=x.device).view(x.shape)  # 0 marks padding
    try:
        mapped = _rerun(call, idx)
    except Exception:  # an op that refuses integer input: keep its channels
        mapped = None
    if not isinstance(mapped, torch.Tensor) or mapped.shape != out.shape:
        st.el.fix_labels(lx)
        return
    result: Labels = {}
    for j, v in lx.items():
        k, line = _follow(mapped, tuple(x.shape), j)
        if k is None or line is None or k in result or not _commutes(call, idx, mapped, j, k, line):
            st.el.fix(v)
            if k is not None and k in result:
                st.el.fix(result.pop(k))  # two channel dims merged into one
            continue
        result[k] = np.where(line >= 0, v[np.clip(line, 0, None)], FIXED)
    st.set(out, result)


def _follow(mapped: torch.Tensor, shape: tuple[int, ...], j: int) -> tuple[int | None, np.ndarray | None]:
    """The one output dim along which input dim ``j``'s coordinate varies, and its values."""
    stride = int(np.prod(shape[j + 1:], dtype=np.int64))
    coord = torch.where(mapped > 0, ((mapped - 1) // stride) % shape[j], -1)
    varying = []
    for k in range(mapped.dim()):
        if mapped.shape[k] > 1:
            ref = coord.amax(dim=k, keepdim=True)
            if not bool(((coord == ref) | (coord < 0)).all()):
                varying.append(k)
    if len(varying) != 1:
        return None, None
    k = varying[0]
    others = tuple(d for d in range(mapped.dim()) if d != k)
    line = (coord.amax(dim=others) if others else coord).cpu().numpy()
    if set(line[line >= 0].tolist()) != set(range(shape[j])):
        return None, None  # some channels are dropped: a hard-coded slice
    return k, line


def _commutes(call: Call, idx: torch.Tensor, mapped: torch.Tensor, j: int, k: int, line: np.ndarray) -> bool:
    """Whether removing the first or last channel first gives the same positions."""
    n = idx.shape[j]
    for p in sorted({0, n - 1}):
        keep_in = torch.tensor([i for i in range(n) if i != p], device=idx.device)
        keep_out = torch.tensor(np.flatnonzero(line != p), device=idx.device)
        try:
            probe = _rerun(call, idx.index_select(j, keep_in))
        except Exception:  # the smaller input no longer fits a size baked into the call
            return False
        expected = mapped.index_select(k, keep_out)
        if not isinstance(probe, torch.Tensor) or probe.shape != expected.shape:
            return False
        if not torch.equal(probe, expected):
            return False
    return True
