"""Queries, keys and values of attention modules, captured with hooks for MiniLM relations.

Two kinds of modules are understood: ``nn.MultiheadAttention`` (its inputs are recorded and
projected again with its own weights, so the student's projections get gradients) and
modules with separate ``query/key/value``-style Linear children (Hugging Face BERT, LLaMA,
OPT, DistilBERT, T5), whose outputs are recorded.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchslim.core import HookSet
from torchslim.distillation._taps import find_module
from torchslim.errors import DataError

__all__ = ["Capture", "QKVRecorder", "head_count", "is_attention"]

_CHILD_NAMES = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"),
                ("q_lin", "k_lin", "v_lin"), ("q", "k", "v"))
_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
             "average_attn_weights", "is_causal")


def _children(module: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module] | None:
    for names in _CHILD_NAMES:
        found = [getattr(module, n, None) for n in names]
        if all(isinstance(f, nn.Linear) for f in found):
            return found[0], found[1], found[2]  # type: ignore[return-value]
    return None


def is_attention(module: nn.Module) -> bool:
    """Whether queries, keys and values of ``module`` can be captured."""
    return isinstance(module, nn.MultiheadAttention) or _children(module) is not None


def head_count(module: nn.Module) -> int | None:
    """The module's attention head count, when it says."""
    for name in ("num_heads", "num_attention_heads", "n_heads"):
        value = getattr(module, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(getattr(module, "config", None), "num_attention_heads", None)
    return value if isinstance(value, int) and value > 0 else None


@dataclasses.dataclass
class Capture:
    """``(B, T, E)`` queries, keys, values and which keys each query may see."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    allowed: torch.Tensor | None = None  # broadcastable to (B, T, S)
    query_mask: torch.Tensor | None = None  # (B, T), True for real tokens


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """torch's masks are True (bool) or very negative (float) where attention is blocked."""
    return ~mask if mask.dtype == torch.bool else mask > -1e4


def _mha_capture(module: nn.MultiheadAttention, raw: dict[str, Any]) -> Capture:
    q_in, k_in, v_in = raw["query"], raw["key"], raw["value"]
    if q_in.dim() == 2:  # unbatched (T, E)
        q_in, k_in, v_in = q_in[None], k_in[None], v_in[None]
    elif not module.batch_first:  # (T, B, E) -> (B, T, E)
        q_in, k_in, v_in = q_in.transpose(0, 1), k_in.transpose(0, 1), v_in.transpose(0, 1)
    if module._qkv_same_embed_dim:
        w_q, w_k, w_v = module.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
    bias = module.in_proj_bias.chunk(3) if module.in_proj_bias is not None else (None, None, None)
    b, t, s = q_in.shape[0], q_in.shape[1], k_in.shape[1]
    allowed, query_mask = None, None
    if (kpm := raw.get("key_padding_mask")) is not None:
        keys = _allowed(kpm.reshape(b, s))
        allowed = keys[:, None, :]  # (B, 1, S)
        query_mask = keys if t == s else None
    if (am := raw.get("attn_mask")) is not None:
        am = _allowed(am)
        am = am.reshape(b, -1, t, s).any(dim=1) if am.dim() == 3 else am  # (B*H, T, S) -> (B, T, S)
        allowed = am if allowed is None else allowed & am
    elif raw.get("is_causal"):
        allowed = torch.ones(t, s, dtype=torch.bool, device=q_in.device).tril()
    return Capture(F.linear(q_in, w_q, bias[0]), F.linear(k_in, w_k, bias[1]),
                   F.linear(v_in, w_v, bias[2]), allowed, query_mask)


class QKVRecorder:
    """Keeps the latest queries, keys and values of tapped attention modules of one model."""

    def __init__(self, who: str) -> None:
        self.who = who
        self._hooks = HookSet()
        self._modules: dict[str, nn.Module] = {}
        self._raw: dict[str, dict[str, Any]] = {}

    def tap(self, model: nn.Module, fqn: str, key: str, role: str) -> nn.Module:
        """Record the attention module ``fqn`` of ``model`` under ``key``; return it."""
        module = find_module(model, fqn, self.who, role)
        self._modules[key] = module
        if isinstance(module, nn.MultiheadAttention):
            self._hooks.forward_pre(module, functools.partial(self._keep_inputs, key), with_kwargs=True)
            return module
        children = _children(module)
        if children is None:
            raise DataError(f"{self.who}: {role} module {fqn!r} ({type(module).__name__}) is not "
                            "nn.MultiheadAttention and has no query/key/value Linear children")
        for name, child in zip("qkv", children):
            self._hooks.forward(child, functools.partial(self._keep_output, key, name))
        return module

    def _keep_inputs(self, key: str, module: nn.Module, args: tuple[Any, ...],
                     kwargs: dict[str, Any]) -> None:
        self._raw[key] = {**dict(zip(_MHA_ARGS, args)), **kwargs}

    def _keep_output(self, key: str, name: str, module: nn.Module, args: Any, out: Any) -> None:
        self._raw.setdefault(key, {})[name] = out

    def get(self, key: str, role: str, inputs: Any) -> Capture:
        """The captured relations' inputs; ``inputs`` supplies an ``attention_mask``."""
        module, raw = self._modules[key], self._raw.get(key)
        if raw is None or (not isinstance(module, nn.MultiheadAttention) and len(raw) < 3):
            raise DataError(f"{self.who}: the {role} attention module {key!r} did not run in the last "
                            "forward pass; choose another layer")
        if isinstance(module, nn.MultiheadAttention):
            return _mha_capture(module, raw)
        capture = Capture(raw["q"], raw["k"], raw["v"])
        b, t, s = capture.q.shape[0], capture.q.shape[1], capture.k.shape[1]
        mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
        if isinstance(mask, torch.Tensor) and mask.shape == (b, s):
            capture.allowed = mask.to(torch.bool)[:, None, :]
            capture.query_mask = mask.to(torch.bool) if t == s else None
        if getattr(module, "is_causal", False):
            causal = torch.ones(t, s, dtype=torch.bool, device=capture.q.device).tril()
            capture.allowed = causal if capture.allowed is None else capture.allowed & causal
        return capture

    def clear(self) -> None:
        """Forget captured tensors."""
        self._raw.clear()

    def remove(self) -> None:
        """Remove every hook and captured tensor."""
        self._hooks.remove()
        self.clear()
