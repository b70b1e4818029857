"""Integer reference of ONNX Runtime's CPU int8 kernels, for the static int8 layers.

ONNX Runtime fuses the QDQ graph that ``export_onnx`` writes into int8 kernels and computes them
in integers, requantizing with float32 formulas of its own. This module computes the same
numbers in PyTorch, code for code, so that the PyTorch model and the ONNX file agree. The
formulas were read in the onnxruntime sources (paths under ``onnxruntime/core`` unless they
start with ``contrib_ops``) and checked against onnxruntime 1.32 on an x86-64 CPU with AVX-512 VNNI:

- **QuantizeLinear** (``mlas/lib/quantize.cpp``, ``MlasQuantizeLinear``):
  ``q = saturate(nearbyint(x / scale) + zp)``, a float32 division rounded half to even.
- **QLinearConv / QGemm accumulator** (``providers/cpu/quantization/qlinearconv.cc``,
  ``contrib_ops/cpu/quantization/quant_gemm.cc``; kernels ``MlasConvSym*``, ``MlasGemm``):
  ``acc = bias + sum((q_x - zp_x) * (q_w - zp_w))`` in int32, exactly. Here the sum runs in
  float64 on integer-valued tensors, which is exact (every partial sum is an integer below 2**53).
- **Requantization** (``MlasRequantizeOutput`` in ``mlas/lib/quantize.cpp``; the post-processing
  of ``mlas/lib/x86_64/ConvSymKernelAvx512Core.S``): the per-channel multiplier is formed in
  float32 as ``(input_scale * weight_scale[c]) / output_scale``, in that order
  (``QLinearConv::ComputeOutputScale``, ``QGemm::ComputeOutputScale``), then
  ``q = saturate(nearbyint(float32(acc) * multiplier) + zp)``: the int32 accumulator is
  converted to float32 (round to nearest even), multiplied once, clamped to
  ``[-zp, 255 - zp]`` and converted back rounding half to even (``requantize``).
- **QGemm with a float output** (a Linear whose output stays float, ``quant_gemm.cc``,
  ``MLAS_QGEMM_SCALE_BIAS_OUTPUT_PROCESSOR``): ``y = float32(acc) * (input_scale * weight_scale[c])``.
- **Fused ReLU / ReLU6**: the int8 kernels have none. ONNX Runtime deletes a ``Relu`` before a
  QuantizeLinear whose uint8 zero point is 0 (``optimizer/qdq_transformer/relu_quantizelinear.cc``)
  and a ``Clip(0, 6)`` whose QuantizeLinear range ``[scale * (0 - zp), scale * (255 - zp)]`` lies
  inside ``[0, 6]`` up to float32 epsilon (``optimizer/qdq_transformer/clip_quantizelinear.cc``);
  the uint8 saturation then clamps. Otherwise the activation stays a float op, the layer is not
  fused, and ONNX Runtime computes it in float (``fused_by_saturation``).
- **QLinearAdd** (``mlas/lib/intrinsics/avx2/qladd_avx2.cpp``, which ``mlas/lib/platform.cpp``
  selects on every x86-64 CPU with AVX2): with ``r_a = scale_a / scale_c``,
  ``r_b = scale_b / scale_c`` and ``fixed = zp_c - fma(r_a, zp_a, r_b * zp_b)`` (the compiler
  contracts that scalar expression into a fused multiply-add), each output is
  ``saturate(nearbyint(fma(q_a, r_a, fma(q_b, r_b, fixed))))`` on the raw codes, in float32
  (``qlinear_add``).

What is not mirrored: pooling (the exported graph averages with ``ReduceMean``, which ONNX
Runtime runs in float between a DequantizeLinear and a QuantizeLinear, as PyTorch does, in
its own summation order); the QLinearAdd formulas of CPUs without AVX2 (SSE2: no fused
multiply-add) and of ARM (NEON: fixed point), which can round ties differently; and on x86-64
CPUs without VNNI, MLAS's u8 x s8 kernels add pairs of products in saturating int16
(``vpmaddubsw``), which can clip a large pair where this reference (and VNNI) sums exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch.overrides import TorchFunctionMode

__all__ = [
    "PendingSum", "SumTracker", "accumulate_conv2d", "accumulate_linear", "codes_on_grid", "dequantize",
    "exact_enabled", "fma32", "fused_by_saturation", "qlinear_add", "quantize", "requantize", "round_output",
    "tag_grid",
]

_GRID = "_torchslim_grid"  # tensor attribute: the (scale, zero_point) grid an exact layer rounded it to
_EPS32 = torch.finfo(torch.float32).eps


def exact_enabled(x: torch.Tensor) -> bool:
    """Whether a layer computes its integer reference on ``x`` rather than the float QDQ form.

    Never while a graph is traced, compiled or exported (the exporter must see the QDQ ops),
    never when ``x`` needs a gradient (rounding codes has none), and only for float32 inputs on
    devices with float64.
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing():  # type: ignore[attr-defined,no-untyped-call]
        return False
    if torch.is_grad_enabled() and x.requires_grad:
        return False
    return x.dtype == torch.float32 and x.device.type != "mps"


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmax: int) -> torch.Tensor:
    """uint8 codes (as float) of ``x``: ``saturate(nearbyint(x / scale) + zp)``, as QuantizeLinear."""
    return torch.clamp(torch.round(x / scale) + zero_point.float(), 0, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """``(q - zp) * scale`` in float32, as DequantizeLinear."""
    return (q - zero_point.float()) * scale


def accumulate_conv2d(q: torch.Tensor, zero_point: torch.Tensor, qweight: torch.Tensor,
                      weight_zero_point: torch.Tensor, qbias: torch.Tensor, **conv: Any) -> torch.Tensor:
    """The int32 accumulator of QLinearConv (bias included), exact, as an integer-valued float64 tensor.

    ``conv`` holds ``stride``, ``padding``, ``dilation`` and ``groups``; padding adds codes equal
    to the zero point, i.e. zeros after subtracting it, as ONNX Runtime pads.
    """
    x = (q - zero_point.float()).double()
    w = qweight.double() - weight_zero_point.double().reshape(-1, 1, 1, 1)
    return F.conv2d(x, w, qbias.double(), **conv).round()  # exact on CPU; round() guards other backends


def accumulate_linear(q: torch.Tensor, zero_point: torch.Tensor, qweight: torch.Tensor,
                      weight_zero_point: torch.Tensor, qbias: torch.Tensor) -> torch.Tensor:
    """The int32 accumulator of QGemm (bias included), exact, as an integer-valued float64 tensor."""
    w = qweight.double() - weight_zero_point.double().reshape(-1, 1)
    return F.linear((q - zero_point.float()).double(), w, qbias.double()).round()


def requantize(acc: torch.Tensor, multiplier: torch.Tensor, zero_point: torch.Tensor,
               qmax: int) -> torch.Tensor:
    """uint8 codes (as float) of ``saturate(nearbyint(float32(acc) * multiplier) + zp)``, as
    ``MlasRequantizeOutput``; ``multiplier`` broadcasts against ``acc`` (per output channel)."""
    return torch.clamp(torch.round(acc.float() * multiplier) + zero_point.float(), 0, qmax)


def fused_by_saturation(activation: str, scale: torch.Tensor, zero_point: torch.Tensor) -> bool:
    """Whether ONNX Runtime drops ``activation`` in front of a QuantizeLinear to the grid
    ``(scale, zero_point)``, so that the int8 kernel's uint8 saturation applies it."""
    if activation == "none":
        return True
    zp = int(zero_point)
    if activation == "relu":
        return zp == 0
    s = scale.detach().float().cpu()
    lower, upper = s * float(0 - zp), s * float(255 - zp)  # float32 products, as the transformer forms them
    return bool(0.0 - lower <= _EPS32) and bool(upper - 6.0 <= _EPS32)


def fma32(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """float32 ``x * y + z`` with a single rounding (a fused multiply-add), for float32 inputs.

    The product is exact in float64; the sum's float64 rounding error is recovered exactly
    (TwoSum) and decides the one case where rounding twice could differ, a float64 sum lying
    exactly halfway between two float32 values.
    """
    p = x.double() * y.double()
    s = p + z.double()
    b = s - p
    err = (p - (s - b)) + (z.double() - b)
    r = s.float()
    off = s - r.double()
    inf = torch.full_like(r, float("inf"))
    toward = torch.nextafter(r, torch.where(off > 0, inf, -inf))
    halfway = (off != 0) & (off.abs() * 2 == (toward.double() - r.double()).abs())
    return torch.where(halfway & (err != 0) & ((err > 0) == (off > 0)), toward, r)


def qlinear_add(qa: torch.Tensor, grid_a: tuple[torch.Tensor, torch.Tensor], qb: torch.Tensor,
                grid_b: tuple[torch.Tensor, torch.Tensor], grid_c: tuple[torch.Tensor, torch.Tensor],
                qmax: int = 255) -> torch.Tensor:
    """uint8 codes (as float) of QLinearAdd(a, b) onto ``grid_c``; each grid is ``(scale, zero_point)``.

    The x86-64 AVX2 kernel of MLAS, operation for operation: ratios of scales, a fixed part
    folding in the zero points, then two float32 fused multiply-adds on the raw codes, ``b`` first.
    """
    (sa, za), (sb, zb), (sc, zc) = grid_a, grid_b, grid_c
    ratio_a, ratio_b = (sa.float() / sc.float()).cpu(), (sb.float() / sc.float()).cpu()
    za_, zb_, zc_ = (torch.tensor(float(int(z))) for z in (za, zb, zc))
    fixed = zc_ - fma32(ratio_a, za_, ratio_b * zb_)
    device = qa.device
    t = fma32(qa, ratio_a.to(device), fma32(qb, ratio_b.to(device), fixed.to(device)))
    return torch.clamp(torch.round(t), 0, qmax)


def round_output(y: torch.Tensor, pending: PendingSum | None, scale: torch.Tensor,
                 zero_point: torch.Tensor) -> torch.Tensor:
    """``y`` rounded to the grid ``(scale, zero_point)`` as ONNX Runtime rounds it, dequantized:
    by QLinearAdd if ``y`` is the sum ``pending`` (with an activation the saturation applies),
    else by QuantizeLinear (after a float ``Add`` or any other op)."""
    if pending is not None and fused_by_saturation(pending.activation, scale, zero_point):
        q = qlinear_add(*pending.a, *pending.b, (scale, zero_point))
    else:
        q = quantize(y, scale, zero_point, 255)
    return tag_grid(dequantize(q, scale, zero_point), scale, zero_point)


def tag_grid(t: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Mark ``t`` (an exact layer's dequantized output) as lying on the grid ``(scale, zero_point)``."""
    setattr(t, _GRID, (scale, zero_point))
    return t


def codes_on_grid(t: Any) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None:
    """``(codes, grid)`` of a tensor an exact layer produced, if its values still lie on that
    grid exactly (an in-place change would have moved them); else None."""
    grid = getattr(t, _GRID, None) if isinstance(t, torch.Tensor) else None
    if grid is None:
        return None
    scale, zero_point = grid
    q = torch.round(t / scale) + zero_point.float()
    if not bool(((q >= 0) & (q <= 255)).all()) or not torch.equal(dequantize(q, scale, zero_point), t):
        return None
    return q, grid


@dataclass(frozen=True)
class PendingSum:
    """A sum of two int8 tensors (their codes and grids, in the order of the ``Add``), with the
    activation applied to it since."""

    tensor: torch.Tensor
    a: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]
    b: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]
    activation: str = "none"


_IN_PLACE_ADDS = frozenset({torch.Tensor.add_, torch.Tensor.__iadd__})
_ADDS = _IN_PLACE_ADDS | {torch.add, torch.Tensor.add, torch.Tensor.__add__}
_RELUS = frozenset({F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_})
_HARDTANHS = frozenset({F.hardtanh, F.hardtanh_})


class SumTracker(TorchFunctionMode):
    """While active, remembers every sum of two tensors that exact layers produced (a residual
    ``x + f(x)``), and a ReLU / ReLU6 applied to such a sum, so that the module rounding the sum
    can compute it as QLinearAdd does (``sum_of``). All results are those of the plain ops."""

    def __init__(self) -> None:
        super().__init__()
        self._sums: dict[int, PendingSum] = {}

    def sum_of(self, t: Any) -> PendingSum | None:
        """The pending sum ``t`` is, if it is one."""
        found = self._sums.get(id(t))
        return found if found is not None and found.tensor is t else None

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _ADDS and len(args) == 2 and not kwargs:
            a, b = codes_on_grid(args[0]), codes_on_grid(args[1])  # before an in-place add moves them
            out = func(*args)
            if func in _IN_PLACE_ADDS and hasattr(out, _GRID):
                delattr(out, _GRID)  # its values left the grid
            if a is not None and b is not None and a[0].shape == b[0].shape and isinstance(out, torch.Tensor):
                self._sums[id(out)] = PendingSum(out, a, b)
            return out
        out = func(*args, **kwargs)
        pending = self.sum_of(args[0]) if args else None
        act = _activation(func, args, kwargs) if pending is not None else None
        if pending is not None and act is not None and isinstance(out, torch.Tensor):
            self._sums[id(out)] = replace(pending, tensor=out, activation=_compose(pending.activation, act))
        return out


def _activation(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    if func in _RELUS:
        return "relu"
    if func is F.relu6:
        return "relu6"
    if func in _HARDTANHS:
        lo = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
        hi = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
        return "relu6" if (float(lo), float(hi)) == (0.0, 6.0) else None
    return None


def _compose(first: str, then: str) -> str:
    return "relu6" if "relu6" in (first, then) else then
