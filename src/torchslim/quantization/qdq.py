"""Quantize-dequantize ops of static int8 models, written to ONNX as QuantizeLinear/DequantizeLinear.

ONNX Runtime fuses ``DequantizeLinear -> Conv/MatMul -> QuantizeLinear`` groups into its int8
kernels (QLinearConv, QGemm ...), so a model whose layers call these ops runs in int8 there.
Each op is an opaque custom op so the dynamo exporter writes exactly one Q/DQ node per call
(see ``torchslim.core.onnx_ops``); in PyTorch they compute the same rounding in float.

Conventions (ONNX's): activations are asymmetric uint8, ``q = saturate(round(x / scale) + zp)``
with round-half-to-even, ``x' = (q - zp) * scale``; weights are symmetric int8 with one scale
per output channel (axis 0); biases are int32 with scale ``input_scale * weight_scale``.
"""

from __future__ import annotations

from typing import Any

import torch

from torchslim.core.onnx_ops import register_translation

__all__ = ["act_qparams", "dequantize_channels", "fake_quantize", "quantize_dequantize"]

_ONNX_UINT8 = 2


def act_qparams(lo: float, hi: float, bits: int = 8) -> tuple[float, int]:
    """``(scale, zero_point)`` of an asymmetric ``bits``-bit grid covering [lo, hi] and 0."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    qmax = (1 << bits) - 1
    scale = max((hi - lo) / qmax, 1e-8)
    zero_point = int(min(max(round(-lo / scale), 0), qmax))
    return scale, zero_point


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                  qmax: int) -> torch.Tensor:
    """``(clamp(round(x / scale) + zp, 0, qmax) - zp) * scale``, computed in float."""
    zp = zero_point.to(x.dtype)
    q = torch.clamp(torch.round(x / scale) + zp, 0, qmax)
    return (q - zp) * scale


@torch.library.custom_op("torchslim::quantize_dequantize", mutates_args=())
def quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                        qmax: int) -> torch.Tensor:
    """Round ``x`` to the uint8 grid ``(scale, zero_point)`` (values 0..qmax) and back to float."""
    return fake_quantize(x, scale, zero_point, qmax)


@quantize_dequantize.register_fake
def _qdq_fake(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmax: int) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("torchslim::dequantize_channels", mutates_args=())
def dequantize_channels(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """``q * scale`` with one scale per index of dim 0 (int8 weights, int32 biases)."""
    shape = (-1,) + (1,) * (q.dim() - 1)
    return (q.float() - zero_point.float().reshape(shape)) * scale.reshape(shape)


@dequantize_channels.register_fake
def _dq_fake(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return torch.empty(q.shape, dtype=torch.float32, device=q.device)


def _onnx_qdq(x: Any, scale: Any, zero_point: Any, qmax: int) -> Any:
    from onnxscript import opset18

    op: Any = opset18
    out = op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point), scale, zero_point)
    if qmax < 255:  # fewer than 8 bits: the uint8 grid saturates at 255, clip to the narrower range
        zp = op.Cast(zero_point, to=1)
        hi = op.Mul(op.Sub(op.Constant(value_float=float(qmax)), zp), scale)
        out = op.Min(out, hi)
    return out


def _onnx_dq(q: Any, scale: Any, zero_point: Any) -> Any:
    from onnxscript import opset18

    op: Any = opset18
    return op.DequantizeLinear(q, scale, zero_point, axis=0)


register_translation(torch.ops.torchslim.quantize_dequantize.default, _onnx_qdq)
register_translation(torch.ops.torchslim.dequantize_channels.default, _onnx_dq)
