"""Replacement modules holding int8 weights and running real int8 kernels."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from torchslim.core.structure import rebuildable
from torchslim.quantization.ops import dynamic_quant_linear
from torchslim.quantization.primitives import (
    dequantize,
    fbgemm_linear_per_tensor,
    onednn_linear_per_tensor,
    pack_fbgemm_weight,
    pack_int8_weight,
    quantize_per_channel_symmetric,
)

__all__ = ["ACTIVATIONS", "DynamicQuantLinear"]

# activations a DynamicQuantLinear can apply to its output (fused into the GEMM where it can)
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh"), "relu": F.relu}


@rebuildable
class DynamicQuantLinear(nn.Module):
    """``nn.Linear`` with an int8 weight; activations are quantized per row at each call.

    The forward pass is one ``torchslim::dynamic_quant_linear`` op: each row (token) of the
    input gets its own symmetric int8 scale, ``torch._int_mm`` multiplies int8 by int8 into
    int32, and the result is rescaled to float. It exports to ONNX as ``MatMulInteger``.
    Layers of 2**20 weights or more also keep, in memory only, a oneDNN-packed copy of the
    weight for inputs of 2 to 128 rows (see ``pack_int8_weight``); it is rebuilt whenever
    ``qweight`` changes.

    With ``per_tensor`` one scale covers the whole input and oneDNN applies it, the weight
    scales and the bias inside the GEMM (faster, coarser; see ``int8_linear_per_tensor``). In
    eager inference on float32 CPU input the same arithmetic runs as a single fbgemm call that
    rounds the input while packing it (``fbgemm_linear_per_tensor``), with the weight and bias
    packed once and cached like the oneDNN copy; training, tracing and export use the op.
    With an ``activation`` (``ACTIVATIONS``; ``quantization.dynamic`` sets it where the layer's
    output went only into that activation) the layer returns ``activation(linear(x))``; in
    per-tensor eager inference oneDNN applies it as the results leave the GEMM
    (``onednn_linear_per_tensor``), elsewhere it runs after the op (exported as its own node).
    With ``smoothed`` (SmoothQuant), the layer first multiplies its input by the buffer
    ``input_scale`` (in,), whose inverse was folded into the weight's columns: the float
    product is unchanged while the input's outlier channels shrink before they are rounded.

    Attributes:
        qweight: int8 buffer (out, in).
        scale: float32 buffer (out,): per output channel, or one value repeated.
        bias: The float bias parameter, or None.
        input_scale: float32 buffer (in,) when ``smoothed``, else absent.
        activation: A key of ``ACTIVATIONS``, or ``"none"``.
    """

    _torchslim_converted = True
    qweight: torch.Tensor
    scale: torch.Tensor
    input_scale: torch.Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 per_channel: bool = True, device: torch.device | str | None = None,
                 smoothed: bool = False, per_tensor: bool = False, activation: str = "none") -> None:
        super().__init__()
        if activation != "none" and activation not in ACTIVATIONS:
            raise ValueError("DynamicQuantLinear: activation must be 'none' or one of "
                             f"{sorted(ACTIVATIONS)}; found {activation!r}")
        self.activation = activation
        self.in_features = in_features
        self.out_features = out_features
        self.per_channel = per_channel
        self.smoothed = smoothed
        self.per_tensor = per_tensor
        if smoothed:
            self.register_buffer("input_scale", torch.ones(in_features, dtype=torch.float32, device=device))
        qweight = torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        self._packed: torch.Tensor | None = None  # cache of the oneDNN layout; not saved
        self._packed_key: tuple[Any, ...] | None = None
        self._fbgemm: Any | None = None  # cache of fbgemm's packed weight and bias; not saved
        self._fbgemm_key: tuple[Any, ...] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.smoothed:
            x = x * self.input_scale.to(x.dtype)
        if self.per_tensor and _plain_inference(x, self.bias):
            if self.activation == "none":
                fused = self._fbgemm_weight()
                if fused is not None:
                    return fbgemm_linear_per_tensor(x, fused)
            else:  # fbgemm's call has no epilogue activation; oneDNN's has
                onednn = self._packed_weight()
                if onednn is not None:
                    return onednn_linear_per_tensor(x, onednn, self.scale, self.bias, self.activation)
        packed = None if torch.compiler.is_compiling() else self._packed_weight()
        out: torch.Tensor = dynamic_quant_linear(x, self.qweight, self.scale, self.bias, packed,
                                                 self.per_tensor)
        return out if self.activation == "none" else ACTIVATIONS[self.activation](out)

    def _packed_weight(self) -> torch.Tensor | None:
        """The cached ``pack_int8_weight(qweight)``, rebuilt whenever ``qweight`` changed."""
        key = (self.qweight.device, self.qweight.data_ptr(), self.qweight._version)
        if self._packed_key != key:
            self._packed, self._packed_key = pack_int8_weight(self.qweight, always=self.per_tensor), key
        return self._packed

    def _fbgemm_weight(self) -> Any | None:
        """The cached ``pack_fbgemm_weight``, rebuilt whenever the weight, scales or bias changed."""
        tensors = (self.qweight, self.scale, self.bias)
        key = tuple((t.data_ptr(), t._version) for t in tensors if t is not None)
        if self._fbgemm_key != key:
            self._fbgemm, self._fbgemm_key = pack_fbgemm_weight(self.qweight, self.scale, self.bias), key
        return self._fbgemm

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        # opaque oneDNN and fbgemm objects cannot be copied
        state.update(_packed=None, _packed_key=None, _fbgemm=None, _fbgemm_key=None)
        return state

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, per_channel: bool = True, smooth: torch.Tensor | None = None,
                    per_tensor: bool = False, activation: str = "none") -> DynamicQuantLinear:
        """Quantize ``linear``'s weight (symmetric int8); the bias is copied unchanged.

        ``smooth`` (in,), positive: input column ``j`` is divided by ``smooth[j]`` at run time
        and weight column ``j`` multiplied by it before rounding (SmoothQuant's migration).
        ``per_tensor``: one activation scale per call instead of one per row.
        ``activation``: applied to the output (the new layer replaces ``linear`` and the
        activation module after it).
        """
        weight = linear.weight
        new = cls(linear.in_features, linear.out_features, linear.bias is not None,
                  per_channel=per_channel, device=weight.device, smoothed=smooth is not None,
                  per_tensor=per_tensor, activation=activation)
        if weight.is_meta:  # nothing to copy from a meta tensor
            return new
        if smooth is not None:
            smooth = smooth.detach().float().to(weight.device)
            new.input_scale.copy_(1.0 / smooth)
            weight = weight.detach().float() * smooth
        qweight, scale = quantize_per_channel_symmetric(weight, per_channel)
        new.qweight.copy_(qweight)
        new.scale.copy_(scale)
        if linear.bias is not None and new.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return new

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """The dequantized float ``nn.Linear`` (``qweight * scale``), e.g. for other runtimes;
        without the fused ``activation``, which the caller applies."""
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                           device=self.qweight.device)
        weight = dequantize(self.qweight, self.scale)
        linear.weight.copy_(weight * self.input_scale if self.smoothed else weight)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone())
        return linear

    def spec_kwargs(self) -> dict[str, int | bool | str]:
        """Constructor arguments for ``structure.json``."""
        spec: dict[str, int | bool | str] = {
            "in_features": self.in_features, "out_features": self.out_features,
            "bias": self.bias is not None, "per_channel": self.per_channel}
        if self.smoothed:
            spec["smoothed"] = True
        if self.per_tensor:
            spec["per_tensor"] = True
        if self.activation != "none":
            spec["activation"] = self.activation
        return spec

    def extra_repr(self) -> str:
        kind = "per_channel" if self.per_channel else "per_tensor"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weight=int8 {kind}" + (", smoothed" if self.smoothed else "")
                + (", per-tensor activations" if self.per_tensor else "")
                + (f", then {self.activation}" if self.activation != "none" else ""))


def _plain_inference(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """True for a plain float32 CPU input while nothing traces, compiles or records gradients."""
    if type(x) is not torch.Tensor or x.device.type != "cpu" or x.dtype != torch.float32 or x.numel() == 0:
        return False  # tensor subclasses (fake tensors of export and compile) take the op
    if torch.compiler.is_compiling():
        return False
    return not torch.is_grad_enabled() or not (x.requires_grad or (bias is not None and bias.requires_grad))
