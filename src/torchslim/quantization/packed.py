"""Group-wise low-bit weights packed into bytes, and the Linear that computes with them.

Weights are split into groups of ``group_size`` consecutive input columns per output row; each
group has a float scale and zero point (asymmetric) or a scale alone (symmetric). Codes of 4
bits or fewer are packed two per byte (3-bit and 2-bit codes use a nibble each: simple and exact,
not the densest layout); 5 to 8 bits take one byte each.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchslim.core.structure import rebuildable
from torchslim.quantization.nbits import exports_as_nbits, matmul_nbits

__all__ = [
    "WeightOnlyLinear",
    "check_layout",
    "dequantize_groups",
    "nibbles",
    "pack_codes",
    "quantize_groups",
    "unpack_codes",
]

_ROWS_PER_BLOCK = 1024  # output rows dequantised at a time in forward


def quantize_groups(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                    clip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest codes (uint8, 0..2^bits-1), scales and zero points, both (out, groups).

    Args:
        weight: (out, in) float weight; ``in`` divisible by ``group_size``.
        bits: Code width, 2..8.
        group_size: Columns per group.
        symmetric: Zero point fixed at the middle code; scale from ``max |w|``.
        clip: Optional (out, groups) factors in (0, 1] shrinking each group's range.
    """
    out_f, in_f = weight.shape
    w = weight.detach().float().reshape(out_f, in_f // group_size, group_size)
    top = 2**bits - 1
    if symmetric:
        half = 2 ** (bits - 1)
        amax = w.abs().amax(-1)
        if clip is not None:
            amax = amax * clip
        scale = (amax / (half - 1 if half > 1 else 1)).clamp_min(1e-12)
        zero = torch.full_like(scale, float(half))
    else:
        lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
        if clip is not None:
            lo, hi = lo * clip, hi * clip
        scale = ((hi - lo) / top).clamp_min(1e-12)
        zero = torch.round(-lo / scale)
    codes = torch.clamp(torch.round(w / scale[..., None]) + zero[..., None], 0, top)
    return codes.to(torch.uint8).reshape(out_f, in_f), scale, zero


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Float weight ``(codes - zero) * scale`` per group; ``codes`` (out, in) uint8."""
    out_f, in_f = codes.shape
    groups = scale.shape[1]
    w = (codes.reshape(out_f, groups, in_f // groups).float() - zero[..., None]) * scale[..., None]
    return w.reshape(out_f, in_f)


def check_layout(width: int, bits: int, group_size: int) -> None:
    """A ValueError unless ``bits`` is in 2..8 and ``group_size`` is positive and divides ``width``
    (what a packed layer rebuilt from structure.json needs)."""
    if not 2 <= bits <= 8 or group_size < 1 or width < 1 or width % group_size:
        raise ValueError(f"expected bits in 2..8 and a group size dividing the width {width}; "
                         f"found bits {bits}, group_size {group_size}")


def nibbles(bits: int, in_features: int) -> bool:
    """Whether codes are packed two per byte: 4 bits or fewer and an even row length."""
    return bits <= 4 and in_features % 2 == 0


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (out, in) -> bytes: two nibbles per byte for ``bits <= 4`` (even ``in``), else one each."""
    if not nibbles(bits, codes.shape[1]):
        return codes.contiguous()
    low, high = codes[:, 0::2], codes[:, 1::2]
    return (low | (high << 4)).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of ``pack_codes``."""
    if not nibbles(bits, in_features):
        return packed
    out = torch.empty(packed.shape[0], in_features, dtype=torch.uint8, device=packed.device)
    out[:, 0::2] = packed & 0x0F
    out[:, 1::2] = packed >> 4
    return out


def _exporting() -> bool:
    is_exporting = getattr(torch.compiler, "is_exporting", None)  # torch >= 2.5
    return bool(is_exporting and is_exporting())


@rebuildable
class WeightOnlyLinear(nn.Module):
    """A Linear whose weight is stored as packed low-bit codes with per-group scales.

    The forward pass dequantises ``_ROWS_PER_BLOCK`` output rows at a time and multiplies in
    the input's float type, so memory holds the packed weight plus one block of float rows.

    Attributes:
        packed: uint8 codes, (out, in / 2) for 4 bits or fewer, else (out, in).
        scale: float32 (out, in / group_size).
        zero: float32 (out, in / group_size) zero points (the middle code when symmetric).
        bias: The float bias parameter, or None.
    """

    _torchslim_converted = True
    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    input_scale: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int = 64,
                 bias: bool = True, input_scale: bool = False) -> None:
        super().__init__()
        check_layout(in_features, bits, group_size)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        width = in_features // 2 if nibbles(bits, in_features) else in_features
        groups = in_features // group_size
        self.register_buffer("packed", torch.zeros(out_features, width, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, groups))
        self.register_buffer("zero", torch.zeros(out_features, groups))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        # AWQ: the codes hold W * s per input channel and inputs are divided by s
        self.register_buffer("input_scale", torch.ones(in_features) if input_scale else None)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                   bias: torch.Tensor | None, input_scale: torch.Tensor | None = None) -> WeightOnlyLinear:
        """Wrap already computed codes (from RTN, GPTQ or AWQ) and their group parameters."""
        out_f, in_f = codes.shape
        layer = cls(in_f, out_f, bits, in_f // scale.shape[1], bias is not None, input_scale is not None)
        if input_scale is not None:
            assert layer.input_scale is not None
            layer.input_scale.copy_(input_scale)
        layer.packed.copy_(pack_codes(codes, bits))
        layer.scale.copy_(scale)
        layer.zero.copy_(zero)
        if bias is not None:
            assert layer.bias is not None
            layer.bias.data.copy_(bias.detach())
        return layer

    def weight(self) -> torch.Tensor:
        """The dequantised float32 weight (out, in)."""
        codes = unpack_codes(self.packed, self.bits, self.in_features)
        return dequantize_groups(codes, self.scale, self.zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x / self.input_scale.to(x.dtype)
        if _exporting() and exports_as_nbits(self.bits, self.group_size):
            args = (x, self.packed, self.scale, self.zero, self.in_features, self.bits)
            out: torch.Tensor = matmul_nbits(*args)
            return out if self.bias is None else out + self.bias
        if self.out_features <= _ROWS_PER_BLOCK:
            return F.linear(x, self.weight().to(x.dtype), self.bias)
        parts = []
        for start in range(0, self.out_features, _ROWS_PER_BLOCK):
            rows = slice(start, start + _ROWS_PER_BLOCK)
            codes = unpack_codes(self.packed[rows], self.bits, self.in_features)
            w = dequantize_groups(codes, self.scale[rows], self.zero[rows]).to(x.dtype)
            parts.append(F.linear(x, w, None if self.bias is None else self.bias[rows]))
        return torch.cat(parts, dim=-1)

    def spec_kwargs(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bits": self.bits,
                "group_size": self.group_size, "bias": self.bias is not None,
                "input_scale": self.input_scale is not None}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}")
