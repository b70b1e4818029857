"""Symmetric int8 quantization math shared by the quantization methods: pure tensor functions.

Conventions: int8 values lie in [-127, 127] (the symmetric range, so -128 is never used and
negation is exact), ``real = int8 * scale`` with no zero point, and rounding is
round-half-to-even (``torch.round``, ONNX ``Round``).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

__all__ = ["PACK_MAX_ROWS", "PACK_MIN_WEIGHTS", "QMAX", "U8_ZERO_POINT", "dequantize",
           "dynamic_quantize_rows", "fbgemm_linear_per_tensor", "int8_linear", "int8_linear_per_tensor",
           "int8_matmul", "onednn_linear_per_tensor", "pack_fbgemm_weight", "pack_int8_weight",
           "quantize_per_channel_symmetric"]

QMAX = 127
PACK_MIN_WEIGHTS = 1 << 20  # weights this large get a oneDNN-packed copy (see pack_int8_weight)
PACK_MAX_ROWS = 128  # inputs of 2..128 rows use it; torch._int_mm is as fast beyond
_EPS = 1e-12  # smallest range used for a scale, so all-zero rows and weights quantize to 0
U8_ZERO_POINT = 128  # zero point of the uint8 form of an int8 value
# activations a quantized Linear can apply in its GEMM's epilogue: oneDNN post-op, algorithm
_ONEDNN_POST_OPS = {"none": ("none", ""), "relu": ("relu", ""), "gelu": ("gelu", "none"),
                    "gelu_tanh": ("gelu", "tanh")}


@torch.no_grad()
def quantize_per_channel_symmetric(
    weight: torch.Tensor, per_channel: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a (out, in) weight to int8 with one scale per output row (or one in all).

    Args:
        weight: The float weight, shape (out, in).
        per_channel: One scale per output row; False uses a single scale for the tensor.

    Returns:
        ``(qweight, scale)``: int8 (out, in) and float32 (out,); with ``per_channel=False``
        every entry of ``scale`` is the same. ``weight ~= qweight * scale[:, None]``.
    """
    w = weight.detach().float()
    amax = w.abs().amax(dim=1) if per_channel else w.abs().amax().expand(w.shape[0])
    scale = amax.clamp_min(_EPS) / QMAX
    qweight = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return qweight, scale.contiguous()


def dequantize(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float32 weight ``qweight * scale[:, None]`` of a (out, in) int8 weight."""
    return qweight.float() * scale[:, None]


def dynamic_quantize_rows(x: torch.Tensor, *, unsigned: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each row (last dimension) of ``x`` to int8 with its own symmetric scale.

    Args:
        x: Float activations of any shape (..., in).
        unsigned: Return ``q + 128`` as uint8 (zero point 128), the form the u8 x s8 kernels
            of oneDNN and ONNX Runtime take; the values are the same.

    Returns:
        ``(q, scale)``: int8 (or uint8) of ``x``'s shape and float32 (..., 1),
        ``x ~= q * scale`` (``(q - 128) * scale`` when unsigned).
    """
    xf = x if x.dtype == torch.float32 else x.float()  # skip a no-op call: tiny layers feel each one
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp_min_(_EPS)
    # Multiply by the reciprocal (one division per row). |x| <= amax bounds |x * inv| by
    # 127 * (1 + 2**-23)**2, which rounds to at most 127: no clamp is needed.
    q = (xf * (QMAX / amax)).round_().to(torch.int8)
    if unsigned:  # q + 128 as uint8: flipping the sign bit of the int8 bytes, one pass over bytes
        return q.view(torch.uint8).bitwise_xor_(U8_ZERO_POINT), amax / QMAX
    return q, amax / QMAX


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int32 product of int8 matrices a (m, k) and b (k, n).

    On CPU this is ``torch._int_mm`` (oneDNN's int8 GEMM, VNNI where the CPU has it). CUDA's
    ``_int_mm`` needs m > 16 and k, n multiples of 8; other shapes and devices multiply the
    integers in float64, which is exact for every int8 product of k < 2**37.
    """
    m, k = a.shape
    n = b.shape[1]
    if a.device.type == "cpu" or (a.device.type == "cuda" and m > 16 and k % 8 == 0 and n % 8 == 0):
        return torch._int_mm(a, b)
    return (a.double() @ b.double()).to(torch.int32)


def pack_int8_weight(qweight: torch.Tensor, *, always: bool = False) -> torch.Tensor | None:
    """oneDNN's pre-packed copy of a large int8 (out, in) weight for ``int8_linear``, else None.

    ``torch._int_mm`` re-lays out its weight operand at every call. For large weights and
    few rows that dominates: 4096 x 4096 at 8 rows took 8.4 ms against 1.8 ms packed
    (9.1 ms in fp32), on one AVX-512 core. Packing pays from about 2**20 weights; smaller
    ones (unless ``always``: ``int8_linear_per_tensor`` fuses its scales into the packed GEMM),
    non-CPU tensors and builds without oneDNN get None. The copy is opaque (not
    serializable), so callers keep it as a cache beside ``qweight``.
    """
    small = qweight.numel() < PACK_MIN_WEIGHTS and not always
    if qweight.device.type != "cpu" or small or not _onednn_ops():
        return None
    packed: torch.Tensor = torch.ops.onednn.qlinear_prepack(qweight, None)
    return packed


def _onednn_ops() -> bool:
    available: bool = torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
    return available and hasattr(torch.ops.onednn, "qlinear_pointwise") and _vnni()


def _vnni() -> bool:
    """Does the CPU multiply u8 x s8 into int32 directly (VNNI)? Without it the kernels sum pairs
    of products in int16 first, which saturates for the full uint8 range the fused paths use
    (oneDNN's and fbgemm's documented int8 caveat; torch.ao rounds to 7 bits for it), so they
    are used only with VNNI; elsewhere the layers take the plain ``torch._int_mm`` path."""
    check = getattr(torch.cpu, "_is_vnni_supported", None)
    return bool(check()) if check is not None else False


def _packed_linear(q_u8: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                   x_scale: float = 1.0, bias: torch.Tensor | None = None,
                   activation: str = "none") -> torch.Tensor:
    """``act(float(q_u8 - 128) @ W_int8.T * scale * x_scale + bias)`` by oneDNN, scales, bias
    and activation (``ACTIVATIONS``) applied in the GEMM's epilogue; with the defaults
    bit-equal to ``float(_int_mm) * scale``."""
    zero_points = torch.zeros(scale.shape[0], dtype=torch.long)
    post_op, algorithm = _ONEDNN_POST_OPS[activation]
    out: torch.Tensor = torch.ops.onednn.qlinear_pointwise(  # output scale 1: float output
        q_u8, x_scale, U8_ZERO_POINT, packed, scale.float(), zero_points, bias,
        1.0, 0, torch.float32, post_op, [], algorithm)
    return out


def int8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    packed: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` with ``W = qweight * scale[:, None]``, run as an int8 GEMM.

    Each row of ``x`` is quantized on the fly (``dynamic_quantize_rows``); the int32
    accumulator times the weight's output-channel scale, times the row scale, plus the
    bias, is the result. Both kernels compute the same accumulator exactly.

    Args:
        x: Activations (..., in), any float dtype.
        qweight: int8 weight (out, in).
        scale: float32 per-output-channel scale (out,).
        bias: Optional (out,) bias.
        packed: ``pack_int8_weight(qweight)``; used for 2 to 128 rows, where it is faster
            than ``torch._int_mm`` (which wins at one row, with its matrix-vector path, and
            at many rows).

    Returns:
        (..., out) in ``x``'s dtype.
    """
    lead, rows = x.shape[:-1], x.numel() // max(x.shape[-1], 1)
    flat = x.reshape(-1, x.shape[-1])
    if packed is not None and 1 < rows <= PACK_MAX_ROWS:
        q, row_scale = dynamic_quantize_rows(flat, unsigned=True)
        out = _packed_linear(q, packed, scale)
    else:
        q, row_scale = dynamic_quantize_rows(flat)
        out = int8_matmul(q, qweight.t()).float().mul_(scale)  # (rows, out)
    out = out.mul_(row_scale).reshape(*lead, qweight.shape[0])
    if bias is not None:
        out.add_(bias)  # in place into float32, whatever the bias dtype
    return out if x.dtype == torch.float32 else out.to(x.dtype)


def int8_linear_per_tensor(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    packed: torch.Tensor | None = None,
) -> torch.Tensor:
    """``int8_linear`` with one activation scale for the whole input instead of one per row.

    Coarser (one outlier row sets every row's step) but one scale lets oneDNN apply it, the
    weight scales and the bias inside the GEMM (``packed`` from ``pack_int8_weight(...,
    always=True)``), so nothing is left to do on the output. Without ``packed`` (other devices,
    builds without oneDNN) the product is ``int8_matmul`` rescaled afterwards.
    """
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    xf = flat if flat.dtype == torch.float32 else flat.float()
    if packed is not None and xf.shape[0] > 0:
        out = onednn_linear_per_tensor(xf, packed, scale, bias)
    else:
        q, amax = _round_per_tensor(xf)
        out = int8_matmul(q, qweight.t()).float().mul_(scale * (amax / QMAX))
        if bias is not None:
            out.add_(bias.float())
    out = out.reshape(*lead, qweight.shape[0])
    return out if x.dtype == torch.float32 else out.to(x.dtype)


def _round_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``x`` (float32) rounded to int8 with the one symmetric scale ``amax / 127``, and amax."""
    amax = _tensor_amax(x)
    return (x * (QMAX / amax)).round_().to(torch.int8), amax  # |x| <= amax: within [-127, 127]


def _tensor_amax(x: torch.Tensor) -> float:
    """``max |x|`` over every element (at least ``_EPS``; 1 for an empty tensor).

    From ``aminmax``: one pass that allocates nothing, where ``x.abs().amax()`` writes a copy
    of ``x`` first (on all-MiniLM-L6-v2 that copy cost about 5% of the int8 model's time).
    """
    if not x.numel():
        return 1.0
    low, high = torch.aminmax(x)
    return max(-float(low), float(high), _EPS)


def onednn_linear_per_tensor(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                             bias: torch.Tensor | None, activation: str = "none") -> torch.Tensor:
    """``activation(int8_linear_per_tensor(x, ...))`` in one oneDNN call (its packed path): the
    same codes and scales (``packed`` from ``pack_int8_weight(..., always=True)``), with the
    activation (``ACTIVATIONS``) applied as the results leave the GEMM instead of in another
    pass over the output. Float32 CPU input."""
    q, amax = _round_per_tensor(x.reshape(-1, x.shape[-1]))
    b = None if bias is None else bias.float()
    q_u8 = q.view(torch.uint8).bitwise_xor_(U8_ZERO_POINT)
    out = _packed_linear(q_u8, packed, scale, amax / QMAX, b, activation)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def pack_fbgemm_weight(qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> Any | None:
    """fbgemm's packed form of an int8 (out, in) weight, its per-channel ``scale`` and ``bias``,
    for ``fbgemm_linear_per_tensor``; None off the CPU or where fbgemm is not the quantized engine.

    The weight goes in as it is (a per-channel quantized view of the same int8 codes, zero
    points 0), so the product is the one ``int8_linear_per_tensor`` computes. The packed object
    is opaque (not serializable); callers keep it as a cache beside ``qweight``.
    """
    if qweight.device.type != "cpu" or not _fbgemm_ops():
        return None
    with warnings.catch_warnings():  # torch flags quantized tensors as deprecated; fbgemm's API takes one
        warnings.simplefilter("ignore", UserWarning)
        zero_points = torch.zeros(qweight.shape[0], dtype=torch.long)
        weight = torch._make_per_channel_quantized_tensor(qweight, scale.double(), zero_points, 0)
        return torch.ops.quantized.linear_prepack(weight, None if bias is None else bias.detach().float())


def _fbgemm_ops() -> bool:
    engine_ok = torch.backends.quantized.engine in ("x86", "fbgemm")
    fused = hasattr(torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32")
    return engine_ok and fused and _vnni()


def fbgemm_linear_per_tensor(x: torch.Tensor, packed: Any) -> torch.Tensor:
    """``int8_linear_per_tensor`` in one fbgemm call: the input is rounded with the same
    symmetric scale ``max|x| / 127`` (zero point 128, as uint8) while fbgemm packs it, and the
    scales and the bias are applied as the int32 results leave the GEMM. Float32 CPU input,
    ``packed`` from ``pack_fbgemm_weight``; ONNX Runtime runs the same arithmetic from
    ``onnx_dynamic_quant_linear``."""
    out: torch.Tensor = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
        x, _tensor_amax(x) / QMAX, U8_ZERO_POINT, packed)
    return out
