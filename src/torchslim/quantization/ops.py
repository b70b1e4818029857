"""The custom op ``torchslim::dynamic_quant_linear``: CPU kernel, shape rule, gradient, ONNX form.

Wrapping the int8 linear in one opaque op lets ``torch.export`` / the dynamo ONNX exporter see
a single node, which ``onnx_dynamic_quant_linear`` writes as integer ONNX ops (the graph
``torch._int_mm`` and friends would otherwise trace into has no ONNX equivalent).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import register_flop_formula

from torchslim.core.onnx_ops import register_translation
from torchslim.quantization.primitives import (
    QMAX,
    U8_ZERO_POINT,
    dequantize,
    int8_linear,
    int8_linear_per_tensor,
)

__all__ = ["dynamic_quant_linear", "onnx_dynamic_quant_linear"]

_ONNX_FLOAT, _ONNX_UINT8 = 1, 2  # onnx.TensorProto data types


@torch.library.custom_op("torchslim::dynamic_quant_linear", mutates_args=())
def dynamic_quant_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    packed: torch.Tensor | None = None,
    per_tensor: bool = False,
) -> torch.Tensor:
    """``x @ (qweight * scale[:, None]).T + bias`` through an int8 GEMM (see ``int8_linear``;
    ``per_tensor``: one activation scale for all of ``x``, ``int8_linear_per_tensor``)."""
    if per_tensor:
        return int8_linear_per_tensor(x, qweight, scale, bias, packed)
    return int8_linear(x, qweight, scale, bias, packed)


@dynamic_quant_linear.register_fake
def _fake(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
          packed: torch.Tensor | None = None, per_tensor: bool = False) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    _, qweight, scale, bias, _, _ = inputs
    ctx.save_for_backward(qweight, scale)
    ctx.bias_dtype = None if bias is None else bias.dtype


_Grads = tuple[torch.Tensor | None, None, None, torch.Tensor | None, None, None]


def _backward(ctx: Any, grad: torch.Tensor) -> _Grads:
    """Straight-through gradient: rounding of the activations counts as the identity."""
    qweight, scale = ctx.saved_tensors
    grad_x = grad @ dequantize(qweight, scale).to(grad.dtype) if ctx.needs_input_grad[0] else None
    grad_bias = None
    if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, grad_bias, None, None


dynamic_quant_linear.register_autograd(_backward, setup_context=_setup_context)


def onnx_dynamic_quant_linear(x: Any, qweight: Any, scale: Any, bias: Any = None, packed: Any = None,
                              per_tensor: bool = False) -> Any:
    """ONNX form of the op, for the dynamo exporter's ``custom_translation_table``.

    The same arithmetic as ``int8_linear`` in the same order, so ONNX Runtime matches
    PyTorch bit for bit: per-row ``amax``, ``q = round(x * 127 / amax)`` shifted to uint8
    (zero point 128: ONNX Runtime 1.32 ran u8 x s8 ``MatMulInteger`` in 2.8 ms where s8 x s8
    took 24 ms, 1024 x 384 -> 1536), ``MatMulInteger`` against the int8 weight, then
    ``acc * scale * (amax / 127) + bias``. Float32 activations are expected; ``packed``
    (a PyTorch-only cache) is never exported. ``per_tensor`` takes ``amax`` over all of ``x``.
    """
    from onnxscript import opset18  # the exporter's torchlib opset; imported lazily

    op: Any = opset18  # its typed stubs cannot follow values built inside this function
    if per_tensor:  # no axes: over every element, to a scalar
        amax = op.Max(op.ReduceMax(x, keepdims=0), op.Neg(op.ReduceMin(x, keepdims=0)))
    else:
        axes = op.Constant(value_ints=[-1])
        amax = op.Max(op.ReduceMax(x, axes, keepdims=1), op.Neg(op.ReduceMin(x, axes, keepdims=1)))
    amax = op.Max(amax, op.Constant(value_float=1e-12))
    qmax = op.Constant(value_float=float(QMAX))
    q = op.Round(op.Mul(x, op.Div(qmax, amax)))  # in [-127, 127], see dynamic_quantize_rows
    q_u8 = op.Cast(op.Add(q, op.Constant(value_float=float(U8_ZERO_POINT))), to=_ONNX_UINT8)
    zero_point = op.Constant(value=_uint8_scalar(U8_ZERO_POINT))
    acc = op.MatMulInteger(q_u8, op.Transpose(qweight, perm=[1, 0]), zero_point)
    out = op.Mul(op.Mul(op.Cast(acc, to=_ONNX_FLOAT), scale), op.Div(amax, qmax))
    return out if bias is None else op.Add(out, bias)


def _uint8_scalar(value: int) -> Any:
    import numpy as np
    import onnx

    return onnx.numpy_helper.from_array(np.array(value, dtype=np.uint8))


register_translation(torch.ops.torchslim.dynamic_quant_linear.default, onnx_dynamic_quant_linear)


@register_flop_formula(torch.ops.torchslim.dynamic_quant_linear)
def _flops(x_shape: Any, qweight_shape: Any, *args: Any, **kwargs: Any) -> int:
    """Multiply-adds of the int8 GEMM, counted as 2 ops each like a float Linear."""
    rows = 1
    for d in x_shape[:-1]:
        rows *= d
    out_features, in_features = qweight_shape
    return int(2 * rows * in_features * out_features)
