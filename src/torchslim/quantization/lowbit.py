"""Binary and ternary weights: the math with straight-through gradients, bit packing, and the
packed ``BinaryLinear`` / ``BinaryConv2d`` / ``TernaryLinear`` / ``TernaryConv2d`` layers.

Binary codes take 1 bit per weight (8 per byte, bit set = +1, clear = -1); ternary codes take
2 bits (4 per byte: 0 -> 0, 1 -> +1, 2 -> -1). Each output row of a weight, flattened, is
packed on its own and padded to whole bytes; one float32 scale per output row follows.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchslim.core.structure import rebuildable

__all__ = ["BinaryConv2d", "BinaryLinear", "TernaryConv2d", "TernaryLinear", "binarize",
           "lowbit_forward", "pack_bits", "sign_ste", "ternarize", "ternary_codes", "unpack_bits"]


class _SignSTE(torch.autograd.Function):
    """+1 where ``x >= 0``, else -1; the gradient passes where ``|x| <= 1`` (clipped STE)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        out: torch.Tensor = torch.where(x >= 0, 1.0, -1.0).to(x.dtype)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        x: torch.Tensor = ctx.saved_tensors[0]
        return grad * (x.abs() <= 1).to(grad.dtype)


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """``sign(x)`` with 0 mapped to +1, and the clipped straight-through gradient."""
    out: torch.Tensor = _SignSTE.apply(x)
    return out


def _rows(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1)


def binarize(weight: torch.Tensor) -> torch.Tensor:
    """XNOR-Net weight ``alpha * sign(W)``, ``alpha = mean |W|`` per output channel.

    Gradients reach ``W`` through both factors (the paper's eq. 7 exactly): via ``alpha`` as
    ``sign(W) / n`` and via ``sign`` where ``|W| <= 1``.
    """
    alpha = _rows(weight).abs().mean(dim=1)
    return alpha.view(-1, *[1] * (weight.dim() - 1)) * sign_ste(weight)


def ternary_codes(weight: torch.Tensor, factor: float,
                  per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """TWN ternary signs in {-1, 0, +1} (float) and the scale of each output row.

    ``delta = factor * mean |W|`` and ``alpha = mean of |W|`` over the weights above
    ``delta``, both per output row or over the whole tensor.
    """
    w = _rows(weight.detach())
    dims: Any = 1 if per_channel else None
    delta = factor * w.abs().mean(dim=dims, keepdim=per_channel)
    keep = w.abs() > delta
    count = keep.sum(dim=dims, keepdim=per_channel).clamp_min(1)
    alpha = (w.abs() * keep).sum(dim=dims, keepdim=per_channel) / count
    signs = torch.where(w >= 0, 1.0, -1.0).to(w.dtype) * keep
    return signs.reshape(weight.shape), alpha.reshape(-1).expand(w.shape[0]).contiguous()


class _TernarySTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, factor: float, per_channel: bool) -> torch.Tensor:
        signs, alpha = ternary_codes(weight, factor, per_channel)
        out: torch.Tensor = alpha.view(-1, *[1] * (weight.dim() - 1)) * signs
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad, None, None  # TWN: the ternary weight's gradient updates the float weight


def ternarize(weight: torch.Tensor, factor: float = 0.7, per_channel: bool = True) -> torch.Tensor:
    """TWN weight ``alpha * t``, ``t`` in {-1, 0, +1}; straight-through (identity) gradient."""
    out: torch.Tensor = _TernarySTE.apply(weight, factor, per_channel)
    return out


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (rows, k) below ``2**bits`` -> uint8 (rows, ceil(k * bits / 8)), low bits first."""
    per = 8 // bits
    rows, k = codes.shape
    padded = torch.zeros(rows, -(-k // per) * per, dtype=torch.int32, device=codes.device)
    padded[:, :k] = codes
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    return (padded.view(rows, -1, per) << shifts).sum(dim=-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: int32 codes (rows, k)."""
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    codes: torch.Tensor = (packed.to(torch.int32)[..., None] >> shifts) & (2**bits - 1)
    return codes.reshape(packed.shape[0], -1)[:, :k]


def lowbit_forward(layer: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   activations: bool) -> torch.Tensor:
    """The layer's op (linear, or conv2d with ``layer``'s geometry) on an already quantized weight.

    With ``activations`` the inputs are binarised too (XNOR-Net): ``op(sign(x), W_b) * K + b``
    with ``K`` the mean of ``|x|`` over the input channels, for a convolution averaged over each
    kernel window (the paper's ``K = A * k``; zero padding counts as 0).
    """
    conv = weight.dim() == 4
    if not activations:
        if conv:
            return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
        return F.linear(x, weight, bias)
    signs = sign_ste(x)
    if conv:
        out = F.conv2d(signs, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)
        kh, kw = weight.shape[2:]
        box = torch.full((1, 1, kh, kw), 1.0 / (kh * kw), dtype=x.dtype, device=x.device)
        mean_abs = x.abs().mean(dim=1, keepdim=True)  # A of the paper: (n, 1, h, w)
        out = out * F.conv2d(mean_abs, box, None, layer.stride, layer.padding, layer.dilation)
        return out if bias is None else out + bias.view(1, -1, 1, 1)
    out = F.linear(signs, weight) * x.abs().mean(dim=-1, keepdim=True)
    return out if bias is None else out + bias


class _Packed(nn.Module):
    """Shared part: ``packed`` uint8 codes and a float32 ``scale`` per output row."""

    _torchslim_converted = True
    bits = 1
    packed: torch.Tensor
    scale: torch.Tensor
    weight_shape: tuple[int, ...]

    def _init_storage(self, shape: tuple[int, ...], bias: bool, activations: bool) -> None:
        self.weight_shape, self.activations = shape, activations
        k = 1
        for n in shape[1:]:
            k *= n
        self.register_buffer("packed", torch.zeros(shape[0], -(-k * self.bits // 8), dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(shape[0]))
        self.bias = nn.Parameter(torch.zeros(shape[0])) if bias else None

    def signs(self) -> torch.Tensor:
        """The weight's codes as float -1 / 0 / +1, in the weight's shape."""
        codes = unpack_bits(self.packed, self.bits, _numel(self.weight_shape[1:]))
        values = codes * 2 - 1 if self.bits == 1 else (codes == 1).int() - (codes == 2).int()
        return values.float().reshape(self.weight_shape)

    def weight(self) -> torch.Tensor:
        """The float weight ``scale * signs``."""
        return self.scale.view(-1, *[1] * (len(self.weight_shape) - 1)) * self.signs()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return lowbit_forward(self, x, self.weight().to(x.dtype), bias, self.activations)

    @torch.no_grad()
    def set_weight(self, signs: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Pack float signs (-1 / 0 / +1, the weight's shape) and store the row scales and bias."""
        s = _rows(signs)
        codes = (s > 0).int() if self.bits == 1 else (s > 0).int() + 2 * (s < 0).int()
        self.packed.copy_(pack_bits(codes, self.bits))
        self.scale.copy_(scale)
        if bias is not None and self.bias is not None:
            self.bias.copy_(bias)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class _PackedLinear(_Packed):
    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 activations: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_storage((out_features, in_features), bias, activations)

    def spec_kwargs(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "activations": self.activations}


class _PackedConv2d(_Packed):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int],
                 stride: tuple[int, int] = (1, 1), padding: str | tuple[int, int] = (0, 0),
                 dilation: tuple[int, int] = (1, 1), groups: int = 1, bias: bool = True,
                 activations: bool = False) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, tuple(kernel_size)
        self.stride, self.dilation, self.groups = tuple(stride), tuple(dilation), groups
        self.padding: str | tuple[int, ...] = padding if isinstance(padding, str) else tuple(padding)
        self._init_storage((out_channels, in_channels // groups, *self.kernel_size), bias, activations)

    def spec_kwargs(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups,
                "bias": self.bias is not None, "activations": self.activations}


@rebuildable
class BinaryLinear(_PackedLinear):
    """``nn.Linear`` with 1-bit weights (8 per byte) and one float scale per output row."""

    bits = 1


@rebuildable
class BinaryConv2d(_PackedConv2d):
    """``nn.Conv2d`` (zero padding) with 1-bit weights and one float scale per output channel."""

    bits = 1


@rebuildable
class TernaryLinear(_PackedLinear):
    """``nn.Linear`` with ternary weights (2 bits, 4 per byte) and one float scale per output row."""

    bits = 2


@rebuildable
class TernaryConv2d(_PackedConv2d):
    """``nn.Conv2d`` (zero padding) with ternary weights and one float scale per output channel."""

    bits = 2
