"""The factorised layer that ``lowrank`` methods put in place of a Linear."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchslim.core.structure import rebuildable

__all__ = ["LowRankLinear"]


@rebuildable
class LowRankLinear(nn.Module):
    """``second(first(x))``: a Linear ``in -> out`` of rank ``rank`` as two thinner Linears.

    It costs ``rank * (in + out)`` multiply-adds per row instead of ``in * out``, runs with the
    ordinary dense kernels of every engine and exports to ONNX as two MatMuls.

    Attributes:
        first: ``nn.Linear(in_features, rank, bias=False)``.
        second: ``nn.Linear(rank, out_features)`` carrying the original bias.
    """

    def __init__(self, in_features: int, rank: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.rank, self.out_features = in_features, rank, out_features
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias)

    @classmethod
    def from_factors(cls, first: torch.Tensor, second: torch.Tensor,
                     bias: torch.Tensor | None) -> LowRankLinear:
        """A layer computing ``x @ first.T @ second.T + bias``; ``first`` is (rank, in)."""
        layer = cls(first.shape[1], first.shape[0], second.shape[0], bias=bias is not None)
        with torch.no_grad():
            layer.first.weight.copy_(first)
            layer.second.weight.copy_(second)
            if bias is not None:
                assert layer.second.bias is not None
                layer.second.bias.copy_(bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.second(self.first(x))
        return out

    def spec_kwargs(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "rank": self.rank, "out_features": self.out_features,
                "bias": self.second.bias is not None}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, rank={self.rank}, out_features={self.out_features}"
