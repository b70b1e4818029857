"""Static int8 layers: int8 weights, fixed activation grids, optional fused ReLU / ReLU6.

A ``QDQConv2d`` / ``QDQLinear`` holds everything ONNX Runtime needs to run the layer in int8:
the symmetric per-channel int8 weight, the int32 bias, and the uint8 grids of its input and
output. The layers are reference implementations of the exported ONNX QDQ graph, not fast
kernels; the int8 speed comes from the exported model in ONNX Runtime, which the report measures.
They compute in one of two ways:

- **Integer reference** (``_int_reference``): what ONNX Runtime's CPU int8 kernels compute,
  code for code: the exact int32 accumulator plus the int32 bias, requantized with ONNX
  Runtime's float32 formula (QLinearConv, QGemm); a ``RoundedOutput`` whose module returns the
  sum of two int8 tensors computes it as QLinearAdd. Used in inference: when the input needs no
  gradient, nothing is being traced, compiled or exported, activations have 8 bits and ONNX
  Runtime does fuse the layer into an int8 kernel (a conv with a float output, a ReLU whose grid
  does not start at 0, or a linear on more than two dimensions stay float there, and here).
- **Float QDQ form**: the same rounding steps in float (dequantize the weights and the input,
  float conv, quantize the output), written to ONNX as QuantizeLinear / DequantizeLinear
  (``qdq``). Used for export and tracing (the graph must contain the QDQ ops), when a gradient
  is wanted, and for grids narrower than 8 bits. It differs from the integer reference only
  where a value lies within float rounding error of a rounding tie.

Between layers both pass float tensors holding dequantized values, ``(q - zero_point) * scale``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from torchslim.core.structure import rebuildable
from torchslim.quantization import _int_reference as ref
from torchslim.quantization.qdq import dequantize_channels, quantize_dequantize

__all__ = ["ACTIVATIONS", "QDQConv2d", "QDQLinear", "QuantGrid", "RoundedOutput"]

ACTIVATIONS = ("none", "relu", "relu6")


class QuantGrid:
    """An activation grid: ``scale``, uint8 ``zero_point`` and the largest code ``qmax``."""

    def __init__(self, scale: float, zero_point: int, qmax: int = 255) -> None:
        self.scale, self.zero_point, self.qmax = float(scale), int(zero_point), int(qmax)


class _QDQ(nn.Module):
    """What the conv and linear forms share: buffers, input/output rounding, conversion."""

    qweight: torch.Tensor
    weight_scale: torch.Tensor
    weight_zero_point: torch.Tensor
    qbias: torch.Tensor
    bias_scale: torch.Tensor
    bias_zero_point: torch.Tensor
    input_scale: torch.Tensor
    input_zero_point: torch.Tensor
    output_scale: torch.Tensor
    output_zero_point: torch.Tensor

    def _init_quant(self, weight_shape: tuple[int, ...], activation: str, quantize_input: bool,
                    quantize_output: bool, activation_bits: int) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, found {activation!r}")
        out = weight_shape[0]
        self.activation, self.activation_bits = activation, activation_bits
        self.quantize_input, self.quantize_output = quantize_input, quantize_output
        self.register_buffer("qweight", torch.zeros(weight_shape, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out))
        self.register_buffer("weight_zero_point", torch.zeros(out, dtype=torch.int8))
        self.register_buffer("qbias", torch.zeros(out, dtype=torch.int32))
        self.register_buffer("bias_scale", torch.ones(out))
        self.register_buffer("bias_zero_point", torch.zeros(out, dtype=torch.int32))
        for side in ("input", "output"):
            self.register_buffer(f"{side}_scale", torch.tensor(1.0))
            self.register_buffer(f"{side}_zero_point", torch.tensor(0, dtype=torch.uint8))

    @property
    def qmax(self) -> int:
        return (1 << self.activation_bits) - 1

    def set_quant(self, weight: torch.Tensor, bias: torch.Tensor | None, weight_bits: int,
                  input_grid: QuantGrid, output_grid: QuantGrid | None,
                  weight_scale: torch.Tensor | None = None) -> None:
        """Quantize the float ``weight``/``bias`` for the given input grid; store both grids.

        ``weight_scale`` (one per output channel) defaults to ``max|w| / (2**(bits-1) - 1)``.
        """
        qmax_w = (1 << (weight_bits - 1)) - 1
        w = weight.detach().float()
        if weight_scale is None:
            scale = w.reshape(w.shape[0], -1).abs().amax(dim=1).clamp_min(1e-12) / qmax_w
        else:
            scale = weight_scale.detach().float().reshape(-1).clamp_min(1e-12)
        shape = (-1,) + (1,) * (w.dim() - 1)
        with torch.no_grad():
            self.qweight.copy_(torch.round(w / scale.reshape(shape)).clamp_(-qmax_w, qmax_w).to(torch.int8))
            self.weight_scale.copy_(scale)
            self.input_scale.fill_(input_grid.scale)
            self.input_zero_point.fill_(input_grid.zero_point)
            self.bias_scale.copy_(scale * input_grid.scale)
            b = torch.zeros(w.shape[0]) if bias is None else bias.detach().float()
            limit = 2.0**31 - 1
            self.qbias.copy_(torch.round(b / self.bias_scale).clamp_(-limit, limit).to(torch.int32))
            if output_grid is not None:
                self.output_scale.fill_(output_grid.scale)
                self.output_zero_point.fill_(output_grid.zero_point)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantize_input:
            return x
        out: torch.Tensor = quantize_dequantize(x, self.input_scale, self.input_zero_point, self.qmax)
        return out

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = dequantize_channels(self.qweight, self.weight_scale, self.weight_zero_point)
        b = dequantize_channels(self.qbias, self.bias_scale, self.bias_zero_point)
        return w, b

    def _activate(self, y: torch.Tensor) -> torch.Tensor:
        if self.activation == "relu":
            return F.relu(y)
        return F.relu6(y) if self.activation == "relu6" else y

    def _output(self, y: torch.Tensor) -> torch.Tensor:
        y = self._activate(y)
        if not self.quantize_output:
            return y
        out: torch.Tensor = quantize_dequantize(y, self.output_scale, self.output_zero_point, self.qmax)
        return out

    def _exact(self, x: torch.Tensor) -> bool:
        """Whether to compute the integer reference (see the module docstring)."""
        if self.activation_bits != 8 or not ref.exact_enabled(x):
            return False
        return not self.quantize_output or ref.fused_by_saturation(
            self.activation, self.output_scale, self.output_zero_point)

    def _input_codes(self, x: torch.Tensor) -> torch.Tensor:
        """The input's uint8 codes: QuantizeLinear's rounding, which also recovers the codes of
        an input already on the grid (the dequantized output of the layer before)."""
        return ref.quantize(x, self.input_scale, self.input_zero_point, self.qmax)

    def _requantized(self, acc: torch.Tensor) -> torch.Tensor:
        """The layer's output from its exact int32 accumulator ``acc`` (channels on dim 1)."""
        shape = (-1,) + (1,) * (acc.dim() - 2)
        if not self.quantize_output:  # QGemm with a float output; the activation is a float op after it
            return self._activate(acc.float() * (self.input_scale * self.weight_scale).reshape(shape))
        multiplier = (self.input_scale * self.weight_scale / self.output_scale).reshape(shape)
        q = ref.requantize(acc, multiplier, self.output_zero_point, self.qmax)  # activation: by saturation
        return ref.tag_grid(ref.dequantize(q, self.output_scale, self.output_zero_point),
                            self.output_scale, self.output_zero_point)

    def _quant_kwargs(self) -> dict[str, Any]:
        return {"activation": self.activation, "quantize_input": self.quantize_input,
                "quantize_output": self.quantize_output, "activation_bits": self.activation_bits}

    def _quant_repr(self) -> str:
        return (f"activation={self.activation}, quantize_input={self.quantize_input}, "
                f"quantize_output={self.quantize_output}")


@rebuildable
class QDQConv2d(_QDQ):
    """A Conv2d (+ fused ReLU/ReLU6) with int8 weights and uint8 input/output grids."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: list[int] | tuple[int, ...],
                 stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1,
                 activation: str = "none", quantize_input: bool = True, quantize_output: bool = True,
                 activation_bits: int = 8) -> None:
        super().__init__()
        k = tuple(kernel_size) if not isinstance(kernel_size, int) else (kernel_size, kernel_size)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, k
        self.stride, self.dilation, self.groups = _pair(stride), _pair(dilation), groups
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self._init_quant((out_channels, in_channels // groups, *k), activation, quantize_input,
                         quantize_output, activation_bits)

    @classmethod
    def like(cls, conv: nn.Conv2d, **quant: Any) -> QDQConv2d:
        """An empty layer with ``conv``'s geometry (call ``set_quant`` to fill it)."""
        padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
        return cls(conv.in_channels, conv.out_channels, tuple(conv.kernel_size), tuple(conv.stride),
                   padding, tuple(conv.dilation), conv.groups, **quant)

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution of the rounded input, before the fused activation and output rounding."""
        w, b = self._weights()
        return F.conv2d(self._input(x), w, b, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantize_output and self._exact(x):  # with a float output, ONNX Runtime's Conv is float
            acc = ref.accumulate_conv2d(self._input_codes(x), self.input_zero_point, self.qweight,
                                        self.weight_zero_point, self.qbias, stride=self.stride,
                                        padding=self.padding, dilation=self.dilation, groups=self.groups)
            return self._requantized(acc)
        return self._output(self.pre_activation(x))

    def spec_kwargs(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups, **self._quant_kwargs()}

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, groups={self.groups}, {self._quant_repr()}")


@rebuildable
class QDQLinear(_QDQ):
    """A Linear (+ fused ReLU/ReLU6) with int8 weights and uint8 input/output grids."""

    def __init__(self, in_features: int, out_features: int, activation: str = "none",
                 quantize_input: bool = True, quantize_output: bool = True, activation_bits: int = 8) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_quant((out_features, in_features), activation, quantize_input, quantize_output,
                         activation_bits)

    @classmethod
    def like(cls, linear: nn.Linear, **quant: Any) -> QDQLinear:
        """An empty layer with ``linear``'s shape (call ``set_quant`` to fill it)."""
        return cls(linear.in_features, linear.out_features, **quant)

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """The product with the rounded input, before the fused activation and output rounding."""
        w, b = self._weights()
        return F.linear(self._input(x), w, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and self._exact(x):  # exported as Gemm (QGemm); more dimensions give MatMul
            acc = ref.accumulate_linear(self._input_codes(x), self.input_zero_point, self.qweight,
                                        self.weight_zero_point, self.qbias)
            return self._requantized(acc)
        return self._output(self.pre_activation(x))

    def spec_kwargs(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, **self._quant_kwargs()}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self._quant_repr()}"


@rebuildable
class RoundedOutput(nn.Module):
    """Wraps a module (a residual block) and rounds its output to a uint8 grid, so every consumer
    of the output (the next block's first layer and its residual add) reads the same int8 values.

    In an exported QDQ graph the block's ``Add`` then sits between DequantizeLinear inputs and a
    QuantizeLinear output, which ONNX Runtime runs as ``QLinearAdd`` in uint8; without it the add
    and everything reading its float output stay float.
    """

    wraps_inner = True  # structure.json wraps the module found at this fqn instead of replacing it
    scale: torch.Tensor
    zero_point: torch.Tensor

    def __init__(self, activation_bits: int = 8) -> None:
        super().__init__()
        if type(activation_bits) is not int or not 2 <= activation_bits <= 8:
            raise ValueError(f"activation_bits must be an integer in 2..8, found {activation_bits!r}")
        self.activation_bits = activation_bits
        self.inner: nn.Module = nn.Identity()
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.uint8))

    @classmethod
    def around(cls, module: nn.Module, grid: QuantGrid, activation_bits: int) -> RoundedOutput:
        """``module`` with its output rounded to ``grid``."""
        wrapper = cls(activation_bits)
        wrapper.inner = module
        with torch.no_grad():
            wrapper.scale.fill_(grid.scale)
            wrapper.zero_point.fill_(grid.zero_point)
        return wrapper.train(module.training)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if self.activation_bits != 8 or first is None or not ref.exact_enabled(first):
            out: torch.Tensor = quantize_dequantize(self.inner(*args, **kwargs), self.scale, self.zero_point,
                                                    (1 << self.activation_bits) - 1)
            return out
        tracker = ref.SumTracker()  # a residual sum inside becomes QLinearAdd in ONNX Runtime
        with tracker:
            y = self.inner(*args, **kwargs)
        return ref.round_output(y, tracker.sum_of(y), self.scale, self.zero_point)

    def spec_kwargs(self) -> dict[str, Any]:
        return {"activation_bits": self.activation_bits}


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    a, b = value
    return (int(a), int(b))
