"""Sharing modules: clustered layers (index into a trained codebook) and factorised embeddings."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchslim.core.structure import rebuildable

__all__ = ["ClusteredConv2d", "ClusteredLinear", "FactorizedEmbedding", "FactorizedTiedHead", "index_dtype"]


def index_dtype(bits: int) -> torch.dtype:
    """The narrowest integer type holding ``2**bits`` cluster indices."""
    return torch.uint8 if bits <= 8 else torch.int16 if bits <= 15 else torch.int32


class _Clustered(nn.Module):
    """Shared part: ``indices`` (buffer) into ``codebook`` (trained parameter)."""

    _torchslim_converted = True
    entropy_coded = False  # set by sharing.huffman: the saved indices are Huffman-coded
    indices: torch.Tensor
    codebook: nn.Parameter

    def _init_codebook(self, shape: tuple[int, ...], bits: int, fixed_zero: bool) -> None:
        self.bits, self.fixed_zero = bits, fixed_zero
        self.register_buffer("indices", torch.zeros(shape, dtype=index_dtype(bits)))
        self.codebook = nn.Parameter(torch.zeros(2**bits))

    def weight(self) -> torch.Tensor:
        """The shared-value weight; entry 0 of the codebook is pinned to 0.0 when ``fixed_zero``."""
        book: torch.Tensor = self.codebook
        if self.fixed_zero:  # pruned weights stay exactly zero, even while the codebook trains
            book = torch.cat([book.new_zeros(1), book[1:]])
        return book[self.indices.long()]


@rebuildable
class ClusteredLinear(_Clustered):
    """``nn.Linear`` whose weight is ``codebook[indices]``."""

    def __init__(self, in_features: int, out_features: int, bits: int = 5, bias: bool = True,
                 fixed_zero: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_codebook((out_features, in_features), bits, fixed_zero)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight().to(x.dtype), self.bias)

    def spec_kwargs(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bits": self.bits,
                "bias": self.bias is not None, "fixed_zero": self.fixed_zero}


@rebuildable
class ClusteredConv2d(_Clustered):
    """``nn.Conv2d`` (zero padding) whose weight is ``codebook[indices]``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int],
                 stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0),
                 dilation: tuple[int, int] = (1, 1), groups: int = 1, bias: bool = True, bits: int = 8,
                 fixed_zero: bool = False) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, tuple(kernel_size)
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        self.groups = groups
        self._init_codebook((out_channels, in_channels // groups, *self.kernel_size), bits, fixed_zero)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight().to(x.dtype), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)

    def spec_kwargs(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": list(self.padding), "dilation": list(self.dilation), "groups": self.groups,
                "bias": self.bias is not None, "bits": self.bits, "fixed_zero": self.fixed_zero}


@rebuildable
class FactorizedEmbedding(nn.Module):
    """``nn.Embedding`` (V, H) as an embedding (V, E) followed by a projection E -> H without bias.

    ``weight`` (V, E) holds the small per-token codes, ``proj`` (H, E) the shared projection:
    ``forward(x) = weight[x] @ proj.T``. The row at ``padding_idx`` gets no gradient, as in
    ``nn.Embedding``.
    """

    _torchslim_converted = True

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int,
                 padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.rank = num_embeddings, embedding_dim, rank
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"padding_idx must be within num_embeddings, found {padding_idx!r}")
            padding_idx = padding_idx % num_embeddings
        self.padding_idx = padding_idx
        self.weight = nn.Parameter(torch.zeros(num_embeddings, rank))
        self.proj = nn.Parameter(torch.zeros(embedding_dim, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.embedding(x, self.weight, self.padding_idx), self.proj)

    def extra_repr(self) -> str:
        pad = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        return f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}{pad}"

    def full_weight(self) -> torch.Tensor:
        """The (V, H) embedding matrix these factors stand for."""
        return self.weight @ self.proj.T

    def spec_kwargs(self) -> dict[str, Any]:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "rank": self.rank, "padding_idx": self.padding_idx}


@rebuildable
class FactorizedTiedHead(nn.Module):
    """Output head tied to a ``FactorizedEmbedding``: ``logits = (h @ proj) @ weight.T + bias``.

    Stands for ``nn.Linear(H, V)`` whose weight was the embedding matrix; ``weight`` and
    ``proj`` are the embedding's own parameters (the same objects), so the tie survives.
    """

    _torchslim_converted = True

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.weight = nn.Parameter(torch.zeros(out_features, rank))
        self.proj = nn.Parameter(torch.zeros(in_features, rank))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}")

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h @ self.proj, self.weight, self.bias)

    def spec_kwargs(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
                "bias": self.bias is not None}
