"""Quantization-aware training: fake-quantized layers trained by the driver, converted to int8 QDQ."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from torchslim.core import Context, MethodConfig, Outcome, TrainedMethod, calibration_inputs, check, register
from torchslim.core.context import first_batch_inputs, take_batches
from torchslim.quantization._static import (
    Calibration,
    FusedFloat,
    calibrate,
    fuse,
    renamed,
    round_module_outputs,
    set_module,
    to_qdq,
)
from torchslim.quantization.fusion import Fusion
from torchslim.quantization.observers import OBSERVERS
from torchslim.quantization.ptq import check_static_bits
from torchslim.quantization.static_modules import QuantGrid, RoundedOutput

__all__ = ["FakeQuantLayer", "FakeRoundedOutput", "QAT", "QATConfig"]

_NAME = "quantization.qat"
ESTIMATORS = ("ste", "lsq")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QATConfig(MethodConfig):
    """Train with int8 rounding simulated in the forward pass, then convert to int8 QDQ layers.

    Papers: Jacob et al., "Quantization and Training of Neural Networks for Efficient
    Integer-Arithmetic-Only Inference", CVPR 2018, https://arxiv.org/abs/1712.05877
    (straight-through estimator, moving-average ranges); Esser et al., "Learned Step Size
    Quantization", ICLR 2020, https://arxiv.org/abs/1902.08153 (``estimator: lsq``).

    Args:
        weight_bits: Bits per weight, 2..8: symmetric, one scale per output channel.
        activation_bits: Bits per activation, 2..8: asymmetric.
        estimator: ``ste``: rounding passes gradients straight through (inside the range) and
            activation ranges follow a moving average of the observed extremes; ``lsq``: every
            step size (weights per channel, activations per tensor) is a trained parameter.
        observer: How the starting activation ranges are chosen from calibration data (as in
            ``quantization.ptq``, whose default it shares: with rounded residual sums, ``minmax``
            ranges cost MobileNetV2 0.6 points, ``mse`` ones did not).
        momentum: Moving-average factor of the ``ste`` activation ranges.
        batches: Batches used to initialise the ranges (``ctx.calib_data``, else training data).
        targets: Layer selectors: an fqn, ``re:<regex>`` or ``type:<ClassName>``.
        ignore: Selectors removed from ``targets`` (they stay float).
        round_outputs: A layer whose input is the output of another module (a residual
            block's sum, as in MobileNetV2 and ResNet) gets that module wrapped in a
            ``RoundedOutput``: the sum is rounded once to the layer's input grid and every
            reader, the next residual add included, uses those int8 values. ONNX Runtime then
            runs the adds as ``QLinearAdd`` in uint8 instead of float between Dequantize and
            Quantize nodes (ONNX Runtime's own ``quantize_static`` does the same). While
            training, the wrapper fake-quantizes the sum (straight-through) and owns that grid
            (moving average with ``ste``, a trained step size with ``lsq``); the layer reading
            it does not round its input again. False keeps the sums float and rounds them only
            where a layer reads them.

    Recipe:
        - method: quantization.qat
          estimator: lsq
          weight_bits: 8
          round_outputs: true   # residual sums in uint8 (the default)

    Notes:
        BatchNorms are folded and ReLUs fused first (as in ``quantization.ptq``), so training
        sees exactly the arithmetic of the converted model; give the stage a small learning
        rate (``train: {epochs: 1, lr: 1.0e-4}``). At the end every layer becomes the same
        ``QDQConv2d`` / ``QDQLinear`` that ``quantization.ptq`` makes (and every rounded module
        output the same ``RoundedOutput``), exported to ONNX QDQ and run in int8 by ONNX
        Runtime. Use it where post-training quantization loses too much: low bit widths, small
        models.
    """

    name: ClassVar[str] = _NAME
    weight_bits: int = 8
    activation_bits: int = 8
    estimator: str = "ste"
    observer: str = "mse"
    momentum: float = 0.01
    batches: int = 8
    targets: tuple[str, ...] = ("type:Conv2d", "type:Linear")
    ignore: tuple[str, ...] = ()
    round_outputs: bool = True

    def __post_init__(self) -> None:
        check_static_bits(_NAME, self.weight_bits, self.activation_bits)
        check(self.estimator in ESTIMATORS, f"{_NAME}: estimator must be one of {list(ESTIMATORS)}; "
                                            f"found {self.estimator!r}")
        check(self.observer in OBSERVERS, f"{_NAME}: observer must be one of {list(OBSERVERS)}; "
                                          f"found {self.observer!r}")
        check(0 < self.momentum <= 1, f"{_NAME}: momentum must be in (0, 1]; found {self.momentum!r}")
        check(self.batches >= 1, f"{_NAME}: batches must be >= 1; found {self.batches!r}")


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` in the forward pass, gradient times ``factor`` (LSQ's step-size gradient scale)."""
    return (x - x * factor).detach() + x * factor


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
               lsq: bool) -> torch.Tensor:
    """Round ``x`` to the grid and back; gradients pass inside the range (and reach ``scale`` with LSQ)."""
    if lsq:
        scale = _grad_scale(scale, 1.0 / (x[0].numel() * qmax) ** 0.5)
    else:
        scale = scale.detach()
    q = _round_ste(torch.clamp(x / scale + zero_point, qmin, qmax))
    return (q - zero_point) * scale


def _add_grid(module: nn.Module, prefix: str, grid: QuantGrid, device: torch.device, lsq: bool) -> None:
    """``<prefix>scale`` (a trained parameter with LSQ, else a buffer) and ``<prefix>zero_point``."""
    scale = torch.tensor(grid.scale, device=device)
    if lsq:
        setattr(module, f"{prefix}scale", nn.Parameter(scale))
    else:
        module.register_buffer(f"{prefix}scale", scale)
    module.register_buffer(f"{prefix}zero_point", torch.tensor(float(grid.zero_point), device=device))


@torch.no_grad()
def _track(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmax: int, momentum: float,
           from_zero: bool) -> None:
    """Move the grid towards the batch's range (moving average of min and max)."""
    lo, hi = -zp * scale, (qmax - zp) * scale
    lo = lo + momentum * (min(float(x.min()), 0.0) - lo)
    hi = hi + momentum * (max(float(x.max()), 0.0) - hi)
    if from_zero:
        lo = torch.zeros_like(lo)
    new_scale = torch.clamp((hi - lo) / qmax, min=1e-8)
    scale.copy_(new_scale)
    zp.copy_(torch.clamp(torch.round(-lo / new_scale), 0, qmax))


def _grid(scale: torch.Tensor, zp: torch.Tensor, qmax: int) -> QuantGrid:
    return QuantGrid(float(scale.detach().abs()), int(zp), qmax)


class FakeQuantLayer(nn.Module):
    """A fused float layer whose weights, input and output are rounded in the forward pass."""

    input_scale: torch.Tensor
    output_scale: torch.Tensor
    input_zero_point: torch.Tensor
    output_zero_point: torch.Tensor

    def __init__(self, fused: FusedFloat, cal: Calibration, fqn: str, weight_bits: int, activation_bits: int,
                 lsq: bool, momentum: float) -> None:
        super().__init__()
        self.layer, self.activation = fused.layer, fused.activation
        # an input on another layer's grid (directly, or through max-pooling) or on the grid of
        # a rounded module output (FakeRoundedOutput) is already rounded
        self.quantize_input = cal.quantize_input[fqn] and fqn not in cal.sources
        self.quantize_output = cal.quantize_output[fqn]
        self.lsq, self.momentum = lsq, momentum
        self.wmax, self.amax = (1 << (weight_bits - 1)) - 1, (1 << activation_bits) - 1
        w = self.layer.weight.detach()
        wscale = w.reshape(w.shape[0], -1).abs().amax(dim=1).clamp_min(1e-8) / self.wmax
        self.weight_scale = nn.Parameter(wscale, requires_grad=lsq)
        _add_grid(self, "input_", cal.inputs[fqn], w.device, lsq)
        _add_grid(self, "output_", cal.outputs[fqn], w.device, lsq)

    def _act(self, x: torch.Tensor, side: str) -> torch.Tensor:
        scale, zp = getattr(self, f"{side}_scale"), getattr(self, f"{side}_zero_point")
        if self.training and not self.lsq:
            _track(x, scale, zp, self.amax, self.momentum, side == "output" and self.activation != "none")
        return fake_quant(x, scale, zp, 0, self.amax, self.lsq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantize_input:
            x = self._act(x, "input")
        w = self.layer.weight
        shape = (-1,) + (1,) * (w.dim() - 1)
        if self.lsq:
            scale = self.weight_scale.abs().clamp_min(1e-8).reshape(shape)
        else:  # the current weights' per-channel range
            amax = w.detach().reshape(w.shape[0], -1).abs().amax(dim=1).clamp_min(1e-8)
            scale = (amax / self.wmax).reshape(shape)
        zero = torch.zeros((), device=w.device)
        wq = fake_quant(w, scale, zero, -self.wmax, self.wmax, self.lsq)
        if isinstance(self.layer, nn.Conv2d):
            c = self.layer
            y = F.conv2d(x, wq, c.bias, c.stride, c.padding, c.dilation, c.groups)
        else:
            y = F.linear(x, wq, self.layer.bias)
        if self.activation == "relu":
            y = F.relu(y)
        elif self.activation == "relu6":
            y = F.relu6(y)
        return self._act(y, "output") if self.quantize_output else y

    def grid(self, side: str) -> QuantGrid:
        return _grid(getattr(self, f"{side}_scale"), getattr(self, f"{side}_zero_point"), self.amax)

    def as_fused(self) -> FusedFloat:
        return FusedFloat(self.layer, self.activation).train(self.training)


class FakeRoundedOutput(nn.Module):
    """A module (a residual block) whose output is fake-quantized to the input grid of the layers
    reading it; it owns that grid while training and becomes a ``RoundedOutput`` at the end."""

    scale: torch.Tensor
    zero_point: torch.Tensor

    def __init__(self, inner: nn.Module, grid: QuantGrid, lsq: bool, momentum: float,
                 device: torch.device) -> None:
        super().__init__()
        self.inner, self.lsq, self.momentum, self.qmax = inner, lsq, momentum, grid.qmax
        _add_grid(self, "", grid, device, lsq)
        self.train(inner.training)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.inner(*args, **kwargs)
        if self.training and not self.lsq:
            _track(y, self.scale, self.zero_point, self.qmax, self.momentum, from_zero=False)
        return fake_quant(y, self.scale, self.zero_point, 0, self.qmax, self.lsq)

    def grid(self) -> QuantGrid:
        return _grid(self.scale, self.zero_point, self.qmax)

    def rounded(self, activation_bits: int) -> RoundedOutput:
        """The inference form: ``inner`` in a ``RoundedOutput`` on the trained grid."""
        return RoundedOutput.around(self.inner, self.grid(), activation_bits).to(self.zero_point.device)


@register(QATConfig)
class QAT(TrainedMethod):
    """Fuse and calibrate at the start, train fake-quantized, convert to QDQ layers at the end."""

    cfg: QATConfig

    def __init__(self, cfg: QATConfig) -> None:
        super().__init__(cfg)
        self.fusions: dict[str, Fusion] = {}  # keyed by the fqns after wrapping, as is self.cal
        self.cal: Calibration | None = None

    def on_start(self, model: nn.Module, ctx: Context) -> nn.Module:
        cfg = self.cfg
        fusions = fuse(model, cfg.targets, cfg.ignore, _NAME)
        device = next(model.parameters()).device
        if ctx.calib_data is not None:
            batches = calibration_inputs(ctx, cfg.batches, _NAME, device)
        else:
            batches = [first_batch_inputs(b) for b in take_batches(ctx.train_data, cfg.batches)]
        cal = calibrate(model, fusions, batches, cfg.observer, cfg.activation_bits, 99.99, device,
                        round_outputs=cfg.round_outputs)
        lsq = cfg.estimator == "lsq"
        for fqn in fusions:
            fused = model.get_submodule(fqn)
            assert isinstance(fused, FusedFloat)
            layer = FakeQuantLayer(fused, cal, fqn, cfg.weight_bits, cfg.activation_bits, lsq, cfg.momentum)
            set_module(model, fqn, layer.train(fused.training))
        def fake(inner: nn.Module, grid: QuantGrid) -> nn.Module:
            return FakeRoundedOutput(inner, grid, lsq, cfg.momentum, device)

        renames = round_module_outputs(model, cal, cfg.activation_bits, fake)
        self.fusions = {f.layer: f for f in (_renamed_fusion(f, renames) for f in fusions.values())}
        self.cal = _renamed_calibration(cal, renames)
        return model

    def on_end(self, model: nn.Module, ctx: Context) -> Outcome:
        assert self.cal is not None
        grids_in: dict[str, QuantGrid] = {}
        grids_out: dict[str, QuantGrid] = {}
        scales: dict[str, torch.Tensor] = {}
        for fqn in self.fusions:
            fake = model.get_submodule(fqn)
            assert isinstance(fake, FakeQuantLayer)
            grids_in[fqn], grids_out[fqn] = fake.grid("input"), fake.grid("output")
            scales[fqn] = fake.weight_scale.detach().abs()
            set_module(model, fqn, fake.as_fused())
        rounded: dict[str, QuantGrid] = {}
        for fqn in self.cal.rounded:  # a wrapper keeps its fqn, and its inner module's fqns
            wrapper = model.get_submodule(fqn)
            assert isinstance(wrapper, FakeRoundedOutput)
            rounded[fqn] = wrapper.grid()
            set_module(model, fqn, wrapper.rounded(self.cfg.activation_bits))
        for fqn, source in self.cal.sources.items():  # the reader's input grid is its source's output grid
            grids_in[fqn] = rounded[source] if source in rounded else grids_out[source]
        cal = dataclasses.replace(self.cal, inputs=grids_in, outputs=grids_out, rounded=rounded)
        replaced = to_qdq(model, self.fusions, cal, self.cfg.weight_bits, self.cfg.activation_bits,
                          weight_scales=scales if self.cfg.estimator == "lsq" else None)
        absorbed = [f for fusion in self.fusions.values() for f in fusion.absorbed()]
        structure: dict[str, dict[str, Any]] = {f: {"wrap": True} for f in rounded}
        structure.update({f: {} for f in (*replaced, *absorbed)})
        return Outcome(model=model, touched=(*replaced, *rounded), structure=structure,
                       stats={"layers": len(replaced), "rounded_outputs": len(rounded)})

    def state_dict(self) -> dict[str, Any]:
        return {}


def _renamed_fusion(fusion: Fusion, renames: dict[str, str]) -> Fusion:
    names = {k: renamed(v, renames) for k in ("layer", "norm", "act_module") if (v := getattr(fusion, k))}
    return dataclasses.replace(fusion, **names)


def _renamed_calibration(cal: Calibration, renames: dict[str, str]) -> Calibration:
    """``cal`` keyed by the fqns after ``renames`` (the wrappers of rounded module outputs)."""
    fields = {f.name: {renamed(k, renames): v for k, v in getattr(cal, f.name).items()}
              for f in dataclasses.fields(cal)}
    fields["sources"] = {k: renamed(v, renames) for k, v in fields["sources"].items()}
    return Calibration(**fields)

