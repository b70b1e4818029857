"""Embedding tables stored as packed low-bit codes, shared with a tied output head.

A language model's tied embedding (SmolLM2: 21% of the parameters) is both the input lookup and
the ``lm_head`` weight. ``quantize_embeddings`` rounds each table to codes once; the lookup
dequantises only the rows it gathers, and the tied head becomes a ``WeightOnlyLinear`` holding
the very same code, scale and zero-point tensors, so the saved file stores them once.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from torchslim.core import surgery
from torchslim.core.structure import rebuildable
from torchslim.errors import ConfigError
from torchslim.quantization.packed import (
    WeightOnlyLinear,
    check_layout,
    dequantize_groups,
    nibbles,
    pack_codes,
    quantize_groups,
    unpack_codes,
)

__all__ = ["WeightOnlyEmbedding", "embedding_groups", "quantize_embeddings", "tied_heads"]

logger = logging.getLogger(__name__)


@rebuildable
class WeightOnlyEmbedding(nn.Module):
    """An ``nn.Embedding`` whose table is stored as packed low-bit codes with per-group scales
    (groups of ``group_size`` consecutive features of a row); a lookup dequantises the rows it reads.

    Attributes:
        packed: uint8 codes, (num, dim / 2) for 4 bits or fewer, else (num, dim).
        scale: float32 (num, dim / group_size).
        zero: float32 (num, dim / group_size).
    """

    _torchslim_converted = True
    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int = 8, group_size: int = 64,
                 padding_idx: int | None = None) -> None:
        super().__init__()
        check_layout(embedding_dim, bits, group_size)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.bits, self.group_size, self.padding_idx = bits, group_size, padding_idx
        width = embedding_dim // 2 if nibbles(bits, embedding_dim) else embedding_dim
        groups = embedding_dim // group_size
        self.register_buffer("packed", torch.zeros(num_embeddings, width, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(num_embeddings, groups))
        self.register_buffer("zero", torch.zeros(num_embeddings, groups))

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, bits: int, group_size: int,
                       symmetric: bool) -> WeightOnlyEmbedding:
        """Round ``embedding``'s table to codes (round to nearest, per group)."""
        num, dim = embedding.weight.shape
        layer = cls(num, dim, bits, group_size, embedding.padding_idx)
        with torch.no_grad():
            codes, scale, zero = quantize_groups(embedding.weight, bits, group_size, symmetric)
            layer.packed.copy_(pack_codes(codes, bits))
            layer.scale.copy_(scale)
            layer.zero.copy_(zero)
        return layer.to(embedding.weight.device).train(embedding.training)

    def weight(self) -> torch.Tensor:
        """The dequantised float32 table (num, dim)."""
        codes = unpack_codes(self.packed, self.bits, self.embedding_dim)
        return dequantize_groups(codes, self.scale, self.zero)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        codes = unpack_codes(self.packed[flat], self.bits, self.embedding_dim)
        rows = dequantize_groups(codes, self.scale[flat], self.zero[flat])
        return rows.reshape(*ids.shape, self.embedding_dim)

    def head(self, bias: torch.Tensor | None = None) -> WeightOnlyLinear:
        """A ``WeightOnlyLinear`` computing ``x @ table^T`` from this table's own tensors (a tied head)."""
        layer = WeightOnlyLinear(self.embedding_dim, self.num_embeddings, self.bits, self.group_size,
                                 bias is not None)
        layer.packed, layer.scale, layer.zero = self.packed, self.scale, self.zero  # shared, stored once
        if bias is not None:
            assert layer.bias is not None
            layer.bias.data.copy_(bias.detach())
        return layer.to(self.packed.device)

    def spec_kwargs(self) -> dict[str, Any]:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim, "bits": self.bits,
                "group_size": self.group_size, "padding_idx": self.padding_idx}

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group_size={self.group_size}"


def embedding_groups(model: nn.Module, group_size: int, who: str) -> dict[str, int]:
    """The group width of each plain ``nn.Embedding`` that can be quantized (checked before anything
    changes): ``group_size`` 0 or wider than a table gives one group per row; one that does not
    divide a table's width is an error naming it. Tables with ``max_norm`` (renormalised at
    lookup) stay float, with a warning."""
    groups = {}
    for fqn, table in model.named_modules():
        if type(table) is not nn.Embedding:
            continue
        if table.max_norm is not None:
            logger.warning("%s: %s renormalises rows at lookup (max_norm); left float", who, fqn)
            continue
        dim = table.embedding_dim
        size = dim if group_size == 0 or group_size >= dim else group_size
        if dim % size:
            raise ConfigError(f"{who}: group_size {group_size} does not divide the width {dim} of embedding "
                              f"{fqn!r}; choose a divisor or embedding_bits: 0")
        groups[fqn] = size
    return groups


def tied_heads(model: nn.Module, tables: dict[str, int]) -> dict[str, str]:
    """Plain ``nn.Linear`` layers whose weight is one of ``tables``' embedding weights: fqn -> table."""
    modules = dict(model.named_modules(remove_duplicate=False))
    weights = {id(modules[f].weight): f for f in tables}
    return {f: weights[id(m.weight)] for f, m in modules.items()
            if type(m) is nn.Linear and id(m.weight) in weights}


def quantize_embeddings(model: nn.Module, groups: dict[str, int], bits: int, symmetric: bool,
                        ) -> dict[str, dict[str, Any]]:
    """Replace each ``nn.Embedding`` of ``groups`` (``embedding_groups``) by a ``WeightOnlyEmbedding``
    at ``bits`` and every ``nn.Linear`` tied to it (the same weight tensor) by the matching head;
    returns ``{fqn: layer info}``."""
    modules = dict(model.named_modules(remove_duplicate=False))
    heads = tied_heads(model, groups)
    done: dict[str, dict[str, Any]] = {}
    made: dict[str, nn.Module] = {}
    for fqn, size in groups.items():
        table = modules[fqn]
        assert isinstance(table, nn.Embedding)
        new = made[fqn] = WeightOnlyEmbedding.from_embedding(table, bits, size, symmetric)
        done[fqn] = {"bits": bits, "group_size": size}
        for head in (h for h, t in heads.items() if t == fqn):
            linear = modules[head]
            assert isinstance(linear, nn.Linear)
            made[head] = new.head(linear.bias).train(linear.training)
            done[head] = {"bits": bits, "group_size": size, "tied_to": fqn}
    surgery.replace_modules(model, [(f, modules[f]) for f in made], lambda f, _: made[f])
    return done
