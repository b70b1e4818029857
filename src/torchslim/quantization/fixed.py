"""Qm.n fixed-point layers computing with integers only: ``FixedPointLinear`` / ``FixedPointConv2d``.

A value in Qm.n with ``total_bits = B`` is an integer ``q`` in ``[-2**(B-1), 2**(B-1) - 1]``
standing for ``q * 2**-n`` (``n`` fractional bits, may be negative or above ``B - 1``).
Rounding is to nearest, halves up (``floor(v * 2**n + 0.5)``), and values outside the range
saturate to its ends. A layer: quantize the input to Q(input_frac), multiply-accumulate the
integers exactly (int8 x int8 -> int32 GEMM for ``B <= 8``, int64 otherwise), add the bias as
an integer at the accumulator's precision (``weight_frac + input_frac`` fractional bits),
shift right with rounding to Q(output_frac), saturate, and return ``q * 2**-output_frac``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchslim.core.structure import rebuildable
from torchslim.quantization.primitives import int8_matmul

__all__ = ["MAX_FRAC", "MIN_FRAC", "FixedPointConv2d", "FixedPointLinear", "frac_bits_for", "int_matmul",
           "round_shift", "saturate", "to_fixed"]

MIN_FRAC, MAX_FRAC = -8, 24  # fractional bits chosen from a range; keeps every shift below 63
_INT32_SAFE_K = 2**17  # int8 x int8 products (at most 2**14) sum exactly in int32 below this depth


def frac_bits_for(amax: float, total_bits: int) -> int:
    """Most fractional bits with which ``amax`` still fits in ``total_bits`` (clamped)."""
    qmax = 2 ** (total_bits - 1) - 1
    if not math.isfinite(amax) or amax <= 0:
        return MAX_FRAC
    n = min(MAX_FRAC, max(MIN_FRAC, math.floor(math.log2((qmax + 0.5) / amax))))
    while n > MIN_FRAC and math.floor(amax * 2.0**n + 0.5) > qmax:  # log2 may be off by one ulp
        n -= 1
    return n


def saturate(q: torch.Tensor, total_bits: int) -> torch.Tensor:
    """Clamp integers to the signed ``total_bits`` range (saturation, never wrap-around)."""
    return q.clamp(-(2 ** (total_bits - 1)), 2 ** (total_bits - 1) - 1)


def to_fixed(x: torch.Tensor, total_bits: int, frac: int) -> torch.Tensor:
    """int64 codes of ``x`` in Q(frac): round to nearest (halves up), saturate."""
    scaled = torch.floor(x.detach().double() * 2.0**frac + 0.5)
    return saturate(scaled, total_bits).to(torch.int64)


def round_shift(acc: torch.Tensor, shift: int) -> torch.Tensor:
    """Arithmetic right shift of int64 ``acc`` by ``shift >= 0`` bits, rounding to nearest (halves up)."""
    if shift == 0:
        return acc
    return (acc + (1 << (shift - 1))) >> shift


def int_matmul(a: torch.Tensor, w: torch.Tensor, total_bits: int) -> torch.Tensor:
    """Exact int64 ``a @ w.T`` of integer codes a (m, k) and w (n, k).

    Codes of 8 bits or fewer run through the int8 GEMM with int32 accumulation, exact while
    ``k < 2**17``; wider codes multiply in int64.
    """
    if total_bits <= 8 and a.shape[1] < _INT32_SAFE_K:
        return int8_matmul(a.to(torch.int8).contiguous(), w.to(torch.int8).t().contiguous()).to(torch.int64)
    return a.to(torch.int64) @ w.to(torch.int64).t()


class _FixedPoint(nn.Module):
    """Shared part: integer weight and bias, the three Q formats, the integer epilogue."""

    _torchslim_converted = True
    weight_int: torch.Tensor
    bias_int: torch.Tensor | None

    def _init_fixed(self, shape: tuple[int, ...], bias: bool, total_bits: int, weight_frac: int,
                    input_frac: int, output_frac: int) -> None:
        if not 2 <= total_bits <= 16 or output_frac > weight_frac + input_frac:
            raise ValueError("fixed-point layer: need 2 <= total_bits <= 16 and output_frac <= weight_frac + "
                             f"input_frac; found total_bits={total_bits}, output_frac={output_frac}, "
                             f"weight_frac={weight_frac}, input_frac={input_frac}")
        self.total_bits, self.weight_frac = total_bits, weight_frac
        self.input_frac, self.output_frac = input_frac, output_frac
        dtype = torch.int8 if total_bits <= 8 else torch.int16
        self.register_buffer("weight_int", torch.zeros(shape, dtype=dtype))
        self.register_buffer("bias_int", torch.zeros(shape[0], dtype=torch.int64) if bias else None)

    def _fixed_kwargs(self) -> dict[str, Any]:
        return {"bias": self.bias_int is not None, "total_bits": self.total_bits,
                "weight_frac": self.weight_frac, "input_frac": self.input_frac,
                "output_frac": self.output_frac}

    @torch.no_grad()
    def set_float(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Quantize a float weight to Q(weight_frac) and a bias to the accumulator's format."""
        self.weight_int.copy_(to_fixed(weight, self.total_bits, self.weight_frac))
        if bias is not None and self.bias_int is not None:
            scaled = torch.floor(bias.detach().double() * 2.0 ** (self.weight_frac + self.input_frac) + 0.5)
            self.bias_int.copy_(scaled.clamp(-(2.0**62), 2.0**62).to(torch.int64))

    def weight(self) -> torch.Tensor:
        """The float weight the integers stand for."""
        return self.weight_int.double().mul(2.0**-self.weight_frac).float()

    def _epilogue(self, acc: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """int64 accumulator (rows, out) -> float output in Q(output_frac)."""
        if self.bias_int is not None:
            acc = acc + self.bias_int
        q = saturate(round_shift(acc, self.weight_frac + self.input_frac - self.output_frac), self.total_bits)
        return (q.double() * 2.0**-self.output_frac).to(dtype)

    def extra_repr(self) -> str:
        return (f"total_bits={self.total_bits}, weight_frac={self.weight_frac}, "
                f"input_frac={self.input_frac}, output_frac={self.output_frac}")


@rebuildable
class FixedPointLinear(_FixedPoint):
    """``nn.Linear`` in Qm.n fixed point with integer-only arithmetic."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, total_bits: int = 8,
                 weight_frac: int = 7, input_frac: int = 4, output_frac: int = 4) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_fixed((out_features, in_features), bias, total_bits, weight_frac, input_frac, output_frac)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = to_fixed(x, self.total_bits, self.input_frac).reshape(-1, self.in_features)
        out = self._epilogue(int_matmul(q, self.weight_int, self.total_bits), x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def spec_kwargs(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, **self._fixed_kwargs()}


@rebuildable
class FixedPointConv2d(_FixedPoint):
    """``nn.Conv2d`` (zero padding) in Qm.n fixed point: im2col, then an integer GEMM per group."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int],
                 stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0),
                 dilation: tuple[int, int] = (1, 1), groups: int = 1, bias: bool = True, total_bits: int = 8,
                 weight_frac: int = 7, input_frac: int = 4, output_frac: int = 4) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, tuple(kernel_size)
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        self.groups = groups
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self._init_fixed(shape, bias, total_bits, weight_frac, input_frac, output_frac)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        q = to_fixed(x, self.total_bits, self.input_frac)
        # codes of at most 16 bits are exact in float32, which unfold needs
        cols = F.unfold(q.float(), self.kernel_size, self.dilation, self.padding, self.stride)  # (n, c*k, L)
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1]).to(torch.int64)
        g = self.groups
        per_group = rows.shape[1] // g
        weight = self.weight_int.reshape(g, self.out_channels // g, per_group)
        acc = torch.cat([int_matmul(rows[:, i * per_group:(i + 1) * per_group], weight[i], self.total_bits)
                         for i in range(g)], dim=1)  # (n * L, out)
        out = self._epilogue(acc, x.dtype)
        oh, ow = (
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, p, d, k, s in zip((h, w), self.padding, self.dilation, self.kernel_size, self.stride,
                                        strict=True)
        )
        return out.reshape(n, oh, ow, self.out_channels).permute(0, 3, 1, 2).contiguous()

    def spec_kwargs(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": list(self.padding), "dilation": list(self.dilation), "groups": self.groups,
                **self._fixed_kwargs()}
