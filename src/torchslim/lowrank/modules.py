"""The factorised layers that ``lowrank`` methods put in place of a Linear or a Conv2d."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchslim.core.structure import rebuildable

__all__ = ["LowRankConv2d", "LowRankLinear", "SeparableConv2d", "TuckerConv2d", "factorised_parts"]

_Pair = int | tuple[int, int]


def _plain(value: Any) -> Any:
    """Tuples as lists, as ``structure.json`` stores them."""
    return list(value) if isinstance(value, tuple) else value


def _geometry(conv: nn.Conv2d) -> dict[str, Any]:
    """Kernel size, stride, padding and dilation of ``conv`` as plain data."""
    return {k: _plain(getattr(conv, k)) for k in ("kernel_size", "stride", "padding", "dilation")}


@torch.no_grad()
def _load_chain(parts: list[tuple[nn.Linear | nn.Conv2d, torch.Tensor]], bias: torch.Tensor | None) -> None:
    """Copy each weight into its module, in order; ``bias`` goes to the last module."""
    for module, weight in parts:
        module.weight.copy_(weight)
    if bias is not None:
        last = parts[-1][0]
        assert last.bias is not None
        last.bias.copy_(bias)


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
        _load_chain([(layer.first, first), (layer.second, second)], bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.second(self.first(x))
        return out

    def spec_kwargs(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "rank": self.rank, "out_features": self.out_features,
                "bias": self.second.bias is not None}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, rank={self.rank}, out_features={self.out_features}"


@rebuildable
class LowRankConv2d(nn.Module):
    """``second(first(x))``: a 1x1 Conv2d ``in -> out`` of rank ``rank`` as two thinner 1x1 convs.

    A 1x1 convolution is a Linear over channels at every pixel; this is ``LowRankLinear`` in
    that form, ``rank * (in + out)`` multiply-adds per output pixel instead of ``in * out``.

    Attributes:
        first: ``nn.Conv2d(in_channels, rank, 1, stride, bias=False)`` (carries the stride).
        second: ``nn.Conv2d(rank, out_channels, 1)`` carrying the original bias.
    """

    def __init__(self, in_channels: int, rank: int, out_channels: int, stride: _Pair = 1,
                 bias: bool = True) -> None:
        super().__init__()
        self.in_channels, self.rank, self.out_channels = in_channels, rank, out_channels
        self.first = nn.Conv2d(in_channels, rank, 1, stride, bias=False)
        self.second = nn.Conv2d(rank, out_channels, 1, bias=bias)

    @classmethod
    def from_factors(cls, conv: nn.Conv2d, first: torch.Tensor, second: torch.Tensor) -> LowRankConv2d:
        """The 1x1 ``conv`` as ``second @ first``: ``first`` (rank, in), ``second`` (out, rank)."""
        layer = cls(conv.in_channels, first.shape[0], conv.out_channels, _plain(conv.stride),
                    bias=conv.bias is not None).to(device=conv.weight.device, dtype=conv.weight.dtype)
        _load_chain([(layer.first, first[:, :, None, None]), (layer.second, second[:, :, None, None])],
                    conv.bias)
        return layer.train(conv.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.second(self.first(x))
        return out

    def spec_kwargs(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "rank": self.rank, "out_channels": self.out_channels,
                "stride": _plain(self.first.stride), "bias": self.second.bias is not None}

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, rank={self.rank}, out_channels={self.out_channels}"


@rebuildable
class TuckerConv2d(nn.Module):
    """``last(core(first(x)))``: Tucker-2 Conv2d, 1x1 ``in -> rank_in``, KxK, 1x1 ``rank_out -> out``.

    The KxK ``core`` keeps the original stride, padding and dilation; ``last`` carries the bias.
    Per output pixel it costs about ``in * rank_in + rank_in * rank_out * K^2 + rank_out * out``
    multiply-adds instead of ``in * out * K^2``, with ordinary dense convolutions.

    Attributes:
        first: ``nn.Conv2d(in_channels, rank_in, 1, bias=False)``.
        core: ``nn.Conv2d(rank_in, rank_out, kernel_size, stride, padding, dilation, bias=False)``.
        last: ``nn.Conv2d(rank_out, out_channels, 1)`` carrying the original bias.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: _Pair, rank_in: int, rank_out: int,
                 stride: _Pair = 1, padding: _Pair | str = 0, dilation: _Pair = 1, bias: bool = True) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.rank_in, self.rank_out = rank_in, rank_out
        self.first = nn.Conv2d(in_channels, rank_in, 1, bias=False)
        self.core = nn.Conv2d(rank_in, rank_out, kernel_size, stride, padding, dilation, bias=False)
        self.last = nn.Conv2d(rank_out, out_channels, 1, bias=bias)

    @classmethod
    def from_factors(cls, conv: nn.Conv2d, u_in: torch.Tensor, core: torch.Tensor,
                     u_out: torch.Tensor) -> TuckerConv2d:
        """``W = core x_0 u_out x_1 u_in``.

        Shapes: ``u_in`` (in, rank_in), ``core`` (rank_out, rank_in, kh, kw), ``u_out`` (out, rank_out).
        """
        layer = cls(conv.in_channels, conv.out_channels, rank_in=u_in.shape[1], rank_out=u_out.shape[1],
                    bias=conv.bias is not None, **_geometry(conv))
        layer = layer.to(device=conv.weight.device, dtype=conv.weight.dtype)
        _load_chain([(layer.first, u_in.T[:, :, None, None]), (layer.core, core),
                     (layer.last, u_out[:, :, None, None])], conv.bias)
        return layer.train(conv.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.last(self.core(self.first(x)))
        return out

    @torch.no_grad()
    def to_conv(self) -> nn.Conv2d:
        """The dense Conv2d this layer computes (for export targets or inspection)."""
        c = self.core
        dense = nn.Conv2d(self.in_channels, self.out_channels, bias=self.last.bias is not None,
                          device=c.weight.device, dtype=c.weight.dtype, **_geometry(c))
        dense.weight.copy_(torch.einsum("or,rshw,si->oihw", self.last.weight[:, :, 0, 0], c.weight,
                                        self.first.weight[:, :, 0, 0]))
        if self.last.bias is not None:
            dense.bias.copy_(self.last.bias)  # type: ignore[union-attr]
        return dense

    def spec_kwargs(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels, **_geometry(self.core),
                "rank_in": self.rank_in, "rank_out": self.rank_out, "bias": self.last.bias is not None}

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, rank_in={self.rank_in}, rank_out={self.rank_out}, "
                f"out_channels={self.out_channels}")


@rebuildable
class SeparableConv2d(nn.Module):
    """``pointwise(depthwise(x))``: a KxK Conv2d as a depthwise KxK (``in -> in * m``) and a 1x1 (``-> out``).

    Depthwise output channel ``c * m + j`` filters input channel ``c`` (PyTorch's grouped
    layout). Per output pixel it costs ``in * m * (K^2 + out)`` multiply-adds instead of
    ``in * out * K^2``.

    Attributes:
        depthwise: ``nn.Conv2d(in, in * m, kernel_size, stride, padding, dilation, groups=in, bias=False)``.
        pointwise: ``nn.Conv2d(in * m, out_channels, 1)`` carrying the original bias.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: _Pair, depth_multiplier: int = 1,
                 stride: _Pair = 1, padding: _Pair | str = 0, dilation: _Pair = 1, bias: bool = True) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.depth_multiplier = depth_multiplier
        mid = in_channels * depth_multiplier
        self.depthwise = nn.Conv2d(in_channels, mid, kernel_size, stride, padding, dilation,
                                   groups=in_channels, bias=False)
        self.pointwise = nn.Conv2d(mid, out_channels, 1, bias=bias)

    @classmethod
    def from_factors(cls, conv: nn.Conv2d, depthwise: torch.Tensor,
                     pointwise: torch.Tensor) -> SeparableConv2d:
        """``depthwise`` (in * m, 1, kh, kw) and ``pointwise`` (out, in * m) in the layout above."""
        multiplier = depthwise.shape[0] // conv.in_channels
        layer = cls(conv.in_channels, conv.out_channels, depth_multiplier=multiplier,
                    bias=conv.bias is not None, **_geometry(conv))
        layer = layer.to(device=conv.weight.device, dtype=conv.weight.dtype)
        _load_chain([(layer.depthwise, depthwise), (layer.pointwise, pointwise[:, :, None, None])], conv.bias)
        return layer.train(conv.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.pointwise(self.depthwise(x))
        return out

    @torch.no_grad()
    def to_conv(self) -> nn.Conv2d:
        """The dense Conv2d this layer computes: ``W[o, c] = sum_j P[o, c*m+j] D[c*m+j]``."""
        d, m = self.depthwise, self.depth_multiplier
        kh, kw = d.kernel_size
        dense = nn.Conv2d(self.in_channels, self.out_channels, bias=self.pointwise.bias is not None,
                          device=d.weight.device, dtype=d.weight.dtype, **_geometry(d))
        filters = d.weight.reshape(self.in_channels, m, kh * kw)
        mixing = self.pointwise.weight.reshape(self.out_channels, self.in_channels, m)
        dense.weight.copy_(torch.einsum("ocj,cjk->ock", mixing, filters).reshape(dense.weight.shape))
        if self.pointwise.bias is not None:
            dense.bias.copy_(self.pointwise.bias)  # type: ignore[union-attr]
        return dense

    def spec_kwargs(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                **_geometry(self.depthwise), "depth_multiplier": self.depth_multiplier,
                "bias": self.pointwise.bias is not None}

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, depth_multiplier={self.depth_multiplier}, "
                f"out_channels={self.out_channels}")


def factorised_parts(model: nn.Module) -> set[str]:
    """Fqns of the layers inside this module's factorised layers (never factorised again)."""
    kinds = (LowRankLinear, LowRankConv2d, TuckerConv2d, SeparableConv2d)
    return {f"{fqn}.{name}" for fqn, module in model.named_modules() if isinstance(module, kinds)
            for name, _ in module.named_children()}
