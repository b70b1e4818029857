"""Attention modules whose heads ``pruning.heads`` can remove: where each head's weights sit, and the cut.

Three layouts are recognised, by structure rather than by class name:

- ``nn.MultiheadAttention`` (packed or separate q/k/v weights; no ``add_bias_kv`` / ``add_zero_attn``).
  Removing heads breaks its ``embed_dim == num_heads * head_dim`` rule, so the module is swapped for a
  ``PrunedMultiheadAttention`` with the same call signature and batch layout.
- BERT-style: a module with ``self.query/key/value`` Linear layers (``attention_head_size``,
  ``num_attention_heads``) and ``output.dense`` (Hugging Face ``BertAttention`` and its copies).
- Llama-style: ``q_proj/k_proj/v_proj/o_proj`` Linear layers with ``head_dim``, possibly with grouped
  query attention: one unit is then a key/value head together with the query heads that read it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from torchslim.core import structure
from torchslim.pruning.structured import slicers

__all__ = ["HeadSite", "Part", "PrunedMultiheadAttention", "cut_heads", "find_sites"]


@structure.rebuildable
class PrunedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` keeping only some of its heads: same call, same batch layout.

    Args:
        embed_dim: Width of the query input and of the output.
        kept_heads: Indices of the original heads this module computes (their order is kept).
        total_heads: Head count of the original module (``head_dim = embed_dim // total_heads``).
        kdim: Width of the key input; ``vdim``: of the value input.
        bias: Whether the projections have biases.
        dropout: Dropout on the attention probabilities while training.
        batch_first: Inputs and outputs are (batch, seq, feature) rather than (seq, batch, feature).

    ``need_weights=True`` returns the attention probabilities of the kept heads (averaged over them
    unless ``average_attn_weights=False``). A 3-D ``attn_mask`` may hold one mask per kept head or,
    as for the original module, one per original head.
    """

    def __init__(self, embed_dim: int, kept_heads: Sequence[int], total_heads: int, kdim: int | None = None,
                 vdim: int | None = None, bias: bool = True, dropout: float = 0.0,
                 batch_first: bool = False) -> None:
        super().__init__()
        self.embed_dim, self.total_heads = embed_dim, total_heads
        self.kept_heads = tuple(int(h) for h in kept_heads)
        self.num_heads, self.head_dim = len(self.kept_heads), embed_dim // total_heads
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.dropout, self.batch_first, self.bias = dropout, batch_first, bias
        inner = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.k_proj = nn.Linear(self.kdim, inner, bias=bias)
        self.v_proj = nn.Linear(self.vdim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)

    def spec_kwargs(self) -> dict[str, Any]:
        return {"embed_dim": self.embed_dim, "kept_heads": list(self.kept_heads),
                "total_heads": self.total_heads, "kdim": self.kdim, "vdim": self.vdim, "bias": self.bias,
                "dropout": self.dropout, "batch_first": self.batch_first}

    @classmethod
    @torch.no_grad()
    def from_multihead_attention(cls, mha: nn.MultiheadAttention,
                                 keep: Sequence[int] | None = None) -> PrunedMultiheadAttention:
        """The heads ``keep`` (default: all) of ``mha``, computing exactly what they computed there."""
        keep = list(range(mha.num_heads)) if keep is None else sorted(keep)
        bias = mha.in_proj_bias is not None
        new = cls(mha.embed_dim, keep, mha.num_heads, mha.kdim, mha.vdim, bias, mha.dropout, mha.batch_first)
        new.to(device=mha.out_proj.weight.device, dtype=mha.out_proj.weight.dtype)
        if mha.in_proj_weight is not None:
            weights = mha.in_proj_weight.chunk(3)
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        biases = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
        rows = _rows(keep, mha.head_dim)
        for proj, w, b in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases):
            proj.weight.copy_(w[rows])
            if b is not None:
                proj.bias.copy_(b[rows])
        new.out_proj.weight.copy_(mha.out_proj.weight[:, rows])
        if mha.out_proj.bias is not None:
            new.out_proj.bias.copy_(mha.out_proj.bias)
        return new.train(mha.training)

    @torch.no_grad()
    def to_multihead_attention(self) -> nn.MultiheadAttention:
        """The equivalent ``nn.MultiheadAttention``: removed heads come back with all-zero weights."""
        w = self.out_proj.weight
        mha = nn.MultiheadAttention(self.embed_dim, self.total_heads, self.dropout, self.bias,
                                    kdim=self.kdim, vdim=self.vdim, batch_first=self.batch_first,
                                    device=w.device, dtype=w.dtype)
        rows = _rows(self.kept_heads, self.head_dim)
        for p in mha.parameters():
            p.zero_()
        full = (mha.in_proj_weight.chunk(3) if mha.in_proj_weight is not None
                else (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight))
        for target, proj in zip(full, (self.q_proj, self.k_proj, self.v_proj)):
            target[rows] = proj.weight
        if mha.in_proj_bias is not None:
            for target, proj in zip(mha.in_proj_bias.chunk(3), (self.q_proj, self.k_proj, self.v_proj)):
                target[rows] = proj.bias
        mha.out_proj.weight[:, rows] = self.out_proj.weight
        if mha.out_proj.bias is not None:
            mha.out_proj.bias.copy_(self.out_proj.bias)
        return mha.train(self.training)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, length, src = query.shape[0], query.shape[1], key.shape[1]
        q = self.q_proj(query).view(n, length, -1, self.head_dim).transpose(1, 2)  # (N, H, L, d)
        k = self.k_proj(key).view(n, src, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(value).view(n, src, -1, self.head_dim).transpose(1, 2)
        mask = self._mask(attn_mask, key_padding_mask, is_causal, (n, length, src), q.dtype)
        p_drop = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            probs = (scores if mask is None else scores + mask).softmax(-1)
            weights = probs.mean(1) if average_attn_weights else probs
            out = F.dropout(probs, p_drop, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_drop)
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, -1))
        if unbatched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _mask(self, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, is_causal: bool,
              sizes: tuple[int, int, int], dtype: torch.dtype) -> torch.Tensor | None:
        """One additive float mask broadcastable to (N, H, L, S), or None."""
        n, length, src = sizes
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(length, src, dtype=torch.bool, device=self.out_proj.weight.device).triu(1)
        mask = None
        if attn_mask is not None:
            mask = _additive(attn_mask, dtype)
            if mask.dim() == 3:
                heads = mask.shape[0] // n
                mask = mask.view(n, heads, length, src)
                if heads != self.num_heads:  # one mask per original head: keep the kept heads' masks
                    mask = mask[:, list(self.kept_heads)]
        if key_padding_mask is not None:
            pad = _additive(key_padding_mask, dtype).view(n, 1, 1, src)
            mask = pad if mask is None else mask + pad
        return mask


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _rows(heads: Sequence[int], width: int) -> torch.Tensor:
    if not heads:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(h * width, (h + 1) * width) for h in heads])


@dataclasses.dataclass(frozen=True)
class Part:
    """A tensor with a slice per unit: unit ``u`` owns ``width`` positions from ``offset + u*width``."""

    fqn: str
    name: str
    axis: int
    offset: int
    width: int
    output: bool = False  # the output projection (read by taylor)

    def indices(self, units: Sequence[int]) -> torch.Tensor:
        return _rows(list(units), self.width) + self.offset


@dataclasses.dataclass(frozen=True)
class HeadSite:
    """One attention module: ``units`` removable units of ``group`` query heads of ``head_dim``."""

    fqn: str
    kind: str  # "mha", "pruned_mha", "bert" or "llama"
    units: int
    group: int
    head_dim: int
    parts: tuple[Part, ...]

    @property
    def heads(self) -> int:
        return self.units * self.group


def _linear(module: nn.Module, *names: str) -> bool:
    return all(type(getattr(module, n, None)) is nn.Linear for n in names)


def _prefix(fqn: str, child: str) -> str:
    return f"{fqn}.{child}" if fqn else child


def _qkvo(fqn: str, names: Sequence[str], head_dim: int, group: int) -> tuple[Part, ...]:
    """Weights of separate q/k/v/o Linear layers (``names`` relative to ``fqn``); biases follow them."""
    parts = [Part(_prefix(fqn, names[0]), "weight", 0, 0, group * head_dim)]
    parts += [Part(_prefix(fqn, n), "weight", 0, 0, head_dim) for n in names[1:3]]
    return (*parts, Part(_prefix(fqn, names[3]), "weight", 1, 0, group * head_dim, output=True))


def _mha_site(fqn: str, m: nn.MultiheadAttention) -> HeadSite | str:
    if not fqn:  # it is swapped for another class, which structure.json cannot do to the root
        return "the model itself (a bare nn.MultiheadAttention: wrap it in a module to prune its heads)"
    if m.bias_k is not None or m.add_zero_attn:
        return f"{fqn} (add_bias_kv / add_zero_attn are not supported)"
    d, e = m.head_dim, m.embed_dim
    if m.in_proj_weight is not None:
        parts = [Part(fqn, "in_proj_weight", 0, i * e, d) for i in range(3)]
    else:
        parts = [Part(fqn, n, 0, 0, d) for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight")]
    parts.append(Part(_prefix(fqn, "out_proj"), "weight", 1, 0, d, output=True))
    return HeadSite(fqn, "mha", m.num_heads, 1, d, tuple(parts))


def _site(fqn: str, m: Any) -> HeadSite | str | None:
    """The site of ``m`` if it is a supported attention module, a reason if almost, else None."""
    if isinstance(m, nn.MultiheadAttention):
        return _mha_site(fqn, m)
    if isinstance(m, PrunedMultiheadAttention):
        names = ("q_proj", "k_proj", "v_proj", "out_proj")
        return HeadSite(fqn, "pruned_mha", m.num_heads, 1, m.head_dim, _qkvo(fqn, names, m.head_dim, 1))
    inner: Any = getattr(m, "self", None)
    out: Any = getattr(m, "output", None)
    if (isinstance(inner, nn.Module) and _linear(inner, "query", "key", "value")
            and isinstance(out, nn.Module) and _linear(out, "dense")
            and isinstance(getattr(inner, "attention_head_size", None), int)):
        size = int(getattr(inner, "attention_head_size"))  # noqa: B009
        names = ("self.query", "self.key", "self.value", "output.dense")
        units = cast(nn.Linear, inner.query).out_features // size
        return HeadSite(fqn, "bert", units, 1, size, _qkvo(fqn, names, size, 1))
    if _linear(m, "q_proj", "k_proj", "v_proj", "o_proj"):
        config = getattr(m, "config", None)
        d = getattr(m, "head_dim", getattr(config, "head_dim", None))
        if not isinstance(d, int) or d <= 0:
            return f"{fqn} (q_proj/k_proj/v_proj/o_proj without an integer head_dim)"
        q, k, v, o = m.q_proj, m.k_proj, m.v_proj, m.o_proj
        if q.out_features % d or k.out_features % d or v.out_features != k.out_features or \
                o.in_features != q.out_features or (q.out_features // d) % (k.out_features // d):
            return f"{fqn} (projection widths do not fit head_dim {d})"
        units, group = k.out_features // d, q.out_features // k.out_features
        return HeadSite(fqn, "llama", units, group, d,
                        _qkvo(fqn, ("q_proj", "k_proj", "v_proj", "o_proj"), d, group))
    return None


def find_sites(model: nn.Module) -> tuple[list[HeadSite], list[str]]:
    """Every supported attention module of ``model`` (outermost first), and those skipped (with why)."""
    sites: list[HeadSite] = []
    skipped: list[str] = []
    for fqn, m in model.named_modules():
        if any(fqn.startswith(s.fqn + ".") or not s.fqn for s in sites):
            continue
        found = _site(fqn, m)
        if isinstance(found, HeadSite):
            sites.append(found)
        elif isinstance(found, str):
            skipped.append(found)
    return sites, skipped


def _set_if_int(module: nn.Module, values: dict[str, int]) -> list[str]:
    names = [n for n in values if isinstance(getattr(module, n, None), int)]
    for n in names:
        setattr(module, n, values[n])
    return names


def cut_heads(model: nn.Module, site: HeadSite, keep: Sequence[int]) -> dict[str, dict[str, Any]]:
    """Keep only units ``keep`` of ``site`` in ``model``; return the structure.json changes."""
    module = model.get_submodule(site.fqn)
    if site.kind in ("mha", "pruned_mha"):
        if isinstance(module, PrunedMultiheadAttention):  # pruned again: index the original heads
            keep = [module.kept_heads[i] for i in keep]
            module = module.to_multihead_attention()
        assert isinstance(module, nn.MultiheadAttention)
        new = PrunedMultiheadAttention.from_multihead_attention(module, keep)
        parent, _, child = site.fqn.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
        return {site.fqn: {}}
    changes: dict[str, dict[str, Any]] = {}
    for part in site.parts:  # a Linear's bias follows its output rows
        slicers.keep(model.get_submodule(part.fqn), part.axis, part.indices(keep))
        changes[part.fqn] = {}
    heads, kv = len(keep) * site.group, len(keep)
    if site.kind == "bert":
        inner = module.get_submodule("self")
        attrs = _set_if_int(inner, {"num_attention_heads": heads, "all_head_size": heads * site.head_dim})
        changes[_prefix(site.fqn, "self")] = {"attrs": attrs, "keep_module": True}
    else:
        counts = {"num_heads": heads, "num_attention_heads": heads, "num_key_value_heads": kv}
        attrs = _set_if_int(module, counts)
        if attrs:
            changes[site.fqn] = {"attrs": attrs, "keep_module": True}
    return changes
