"""The custom op ``torchslim::matmul_nbits``: a group-quantized linear, written to ONNX as MatMulNBits.

``WeightOnlyLinear`` calls this op while it is being exported (``torch.export`` / the dynamo ONNX
exporter), so the ONNX file keeps the packed 4- or 8-bit codes and ONNX Runtime multiplies with
its ``com.microsoft.MatMulNBits`` kernel instead of a float weight rebuilt by unpacking ops. In
PyTorch the op computes exactly what ``WeightOnlyLinear.forward`` computes.

MatMulNBits stores what ``WeightOnlyLinear`` stores, in another shape: codes packed low nibble
first along the input dimension as ``(N, blocks, block_size * bits / 8)`` bytes, one float scale
per block, and uint8 zero points (two per byte for 4 bits, each row padded to whole bytes).
Its ``block_size`` must be a power of two of at least 16, and only 4- and 8-bit codes share our
packing, so other layers keep the plain export (see ``exports_as_nbits``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from torchslim.core.onnx_ops import register_translation

__all__ = ["exports_as_nbits", "matmul_nbits", "onnx_matmul_nbits"]

_ONNX_UINT8 = 2  # onnx.TensorProto.UINT8
_MS_DOMAIN = "com.microsoft"


def exports_as_nbits(bits: int, group_size: int) -> bool:
    """Whether a layer with these settings maps onto MatMulNBits (4/8 bits, power-of-two groups >= 16)."""
    return bits in (4, 8) and group_size >= 16 and group_size & (group_size - 1) == 0


@torch.library.custom_op("torchslim::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 in_features: int, bits: int) -> torch.Tensor:
    """``x @ W.T`` for ``W = (codes - zero) * scale`` per group; ``packed`` as ``WeightOnlyLinear.packed``."""
    from torchslim.quantization.packed import dequantize_groups, unpack_codes  # packed imports this module

    weight = dequantize_groups(unpack_codes(packed, bits, in_features), scale, zero)
    return F.linear(x, weight.to(x.dtype))


@matmul_nbits.register_fake
def _fake(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
          in_features: int, bits: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], scale.shape[0]))


def onnx_matmul_nbits(x: Any, packed: Any, scale: Any, zero: Any, in_features: int, bits: int) -> Any:
    """ONNX form: reshape the codes and scales, pack the zero points, call ``com.microsoft.MatMulNBits``.

    The reshapes and the zero-point packing act on initializers only, so ONNX Runtime folds
    them into constants when it loads the file, before MatMulNBits prepacks its weight.
    """
    import onnxscript
    from onnxscript import opset18

    op: Any = opset18
    out_f, groups = (int(d) for d in scale.shape)
    block = in_features // groups
    blob = block * bits // 8

    def ints(*values: int) -> Any:
        return op.Constant(value_ints=list(values))

    codes = op.Reshape(packed, ints(out_f, groups, blob))
    zp = op.Cast(zero, to=_ONNX_UINT8)  # integer-valued floats in 0 .. 2^bits - 1
    if bits == 4:
        if groups % 2:
            zp = op.Pad(zp, ints(0, 0, 0, 1))
        pairs = op.Reshape(zp, ints(out_f, (groups + 1) // 2, 2))
        low, high = (op.Slice(pairs, ints(i), ints(i + 1), ints(2)) for i in (0, 1))
        four = op.Cast(op.Constant(value_int=4), to=_ONNX_UINT8)
        zp = op.Squeeze(op.BitwiseOr(low, op.BitShift(high, four, direction="LEFT")), ints(2))
    matmul = onnxscript.values.Op(onnxscript.values.Opset(_MS_DOMAIN, 1), "MatMulNBits", _schema())
    return matmul(x, codes, op.Reshape(scale, ints(-1)), op.Reshape(zp, ints(-1)),
                  K=in_features, N=out_f, bits=bits, block_size=block)


def _schema() -> Any:
    """The signature of ONNX Runtime's contrib op, which onnx's own schema registry does not hold."""
    from onnx.defs import OpSchema

    param, attr = OpSchema.FormalParameter, OpSchema.Attribute
    return OpSchema(
        "MatMulNBits", _MS_DOMAIN, 1,
        inputs=[param("A", "T1"), param("B", "T2"), param("scales", "T1"), param("zero_points", "T3")],
        outputs=[param("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)"], ""), ("T2", ["tensor(uint8)"], ""),
                          ("T3", ["tensor(uint8)"], "")],
        attributes=[attr(name, OpSchema.AttrType.INT, "") for name in ("K", "N", "bits", "block_size")],
    )


register_translation(torch.ops.torchslim.matmul_nbits.default, onnx_matmul_nbits)


@register_flop_formula(torch.ops.torchslim.matmul_nbits)
def _flops(x_shape: Any, packed_shape: Any, scale_shape: Any, *args: Any, **kwargs: Any) -> int:
    """Multiply-adds of the matrix product, counted as 2 ops each like a float Linear."""
    rows = 1
    for d in x_shape[:-1]:
        rows *= d
    return int(2 * rows * x_shape[-1] * scale_shape[0])
