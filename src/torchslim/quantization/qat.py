"""Quantization-aware training: fake-quantized layers trained by the driver, converted to int8 QDQ."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from torchslim.core import Context, MethodConfig, Outcome, TrainedMethod, calibration_inputs, check, register
from torchslim.core.context import first_batch_inputs, take_batches
from torchslim.quantization._static import Calibration, FusedFloat, calibrate, fuse, to_qdq
from torchslim.quantization.fusion import Fusion
from torchslim.quantization.observers import OBSERVERS
from torchslim.quantization.ptq import check_static_bits
from torchslim.quantization.static_modules import QuantGrid

__all__ = ["FakeQuantLayer", "QAT", "QATConfig"]

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
            ``quantization.ptq``).
        momentum: Moving-average factor of the ``ste`` activation ranges.
        batches: Batches used to initialise the ranges (``ctx.calib_data``, else training data).
        targets: Layer selectors: an fqn, ``re:<regex>`` or ``type:<ClassName>``.
        ignore: Selectors removed from ``targets`` (they stay float).

    Recipe:
        - method: quantization.qat
          estimator: lsq
          weight_bits: 8

    Notes:
        BatchNorms are folded and ReLUs fused first (as in ``quantization.ptq``), so training
        sees exactly the arithmetic of the converted model; give the stage a small learning
        rate (``train: {epochs: 1, lr: 1.0e-4}``). At the end every layer becomes the same
        ``QDQConv2d`` / ``QDQLinear`` that ``quantization.ptq`` makes, exported to ONNX QDQ and
        run in int8 by ONNX Runtime. Use it where post-training quantization loses too much:
        low bit widths, small models.
    """

    name: ClassVar[str] = _NAME
    weight_bits: int = 8
    activation_bits: int = 8
    estimator: str = "ste"
    observer: str = "minmax"
    momentum: float = 0.01
    batches: int = 8
    targets: tuple[str, ...] = ("type:Conv2d", "type:Linear")
    ignore: tuple[str, ...] = ()

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
        # an input on another layer's grid (directly, or through max-pooling) is already rounded
        self.quantize_input = cal.quantize_input[fqn] and fqn not in cal.sources
        self.quantize_output = cal.quantize_output[fqn]
        self.lsq, self.momentum = lsq, momentum
        self.wmax, self.amax = (1 << (weight_bits - 1)) - 1, (1 << activation_bits) - 1
        w = self.layer.weight.detach()
        wscale = w.reshape(w.shape[0], -1).abs().amax(dim=1).clamp_min(1e-8) / self.wmax
        self.weight_scale = nn.Parameter(wscale, requires_grad=lsq)
        for side, grid in (("input", cal.inputs[fqn]), ("output", cal.outputs[fqn])):
            scale = torch.tensor(grid.scale, device=w.device)
            if lsq:
                setattr(self, f"{side}_scale", nn.Parameter(scale))
            else:
                self.register_buffer(f"{side}_scale", scale)
            self.register_buffer(f"{side}_zero_point", torch.tensor(float(grid.zero_point), device=w.device))

    def _act(self, x: torch.Tensor, side: str) -> torch.Tensor:
        scale, zp = getattr(self, f"{side}_scale"), getattr(self, f"{side}_zero_point")
        if self.training and not self.lsq:
            self._track(x, side)
        return fake_quant(x, scale, zp, 0, self.amax, self.lsq)

    @torch.no_grad()
    def _track(self, x: torch.Tensor, side: str) -> None:
        """Move the grid towards the batch's range (moving average of min and max)."""
        scale, zp = getattr(self, f"{side}_scale"), getattr(self, f"{side}_zero_point")
        lo, hi = -zp * scale, (self.amax - zp) * scale
        lo = lo + self.momentum * (min(float(x.min()), 0.0) - lo)
        hi = hi + self.momentum * (max(float(x.max()), 0.0) - hi)
        if side == "output" and self.activation != "none":
            lo = torch.zeros_like(lo)
        new_scale = torch.clamp((hi - lo) / self.amax, min=1e-8)
        scale.copy_(new_scale)
        zp.copy_(torch.clamp(torch.round(-lo / new_scale), 0, self.amax))

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
        scale = float(getattr(self, f"{side}_scale").detach().abs())
        return QuantGrid(scale, int(getattr(self, f"{side}_zero_point")), self.amax)

    def as_fused(self) -> FusedFloat:
        return FusedFloat(self.layer, self.activation).train(self.training)


@register(QATConfig)
class QAT(TrainedMethod):
    """Fuse and calibrate at the start, train fake-quantized, convert to QDQ layers at the end."""

    cfg: QATConfig

    def __init__(self, cfg: QATConfig) -> None:
        super().__init__(cfg)
        self.fusions: dict[str, Fusion] = {}
        self.cal: Calibration | None = None

    def on_start(self, model: nn.Module, ctx: Context) -> nn.Module:
        cfg = self.cfg
        self.fusions = fuse(model, cfg.targets, cfg.ignore, _NAME)
        device = next(model.parameters()).device
        if ctx.calib_data is not None:
            batches = calibration_inputs(ctx, cfg.batches, _NAME, device)
        else:
            batches = [first_batch_inputs(b) for b in take_batches(ctx.train_data, cfg.batches)]
        self.cal = calibrate(model, self.fusions, batches, cfg.observer, cfg.activation_bits, 99.99, device)
        for fqn in self.fusions:
            fused = model.get_submodule(fqn)
            assert isinstance(fused, FusedFloat)
            layer = FakeQuantLayer(fused, self.cal, fqn, cfg.weight_bits, cfg.activation_bits,
                                   cfg.estimator == "lsq", cfg.momentum)
            parent, _, child = fqn.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.train(fused.training))
        return model

    def on_end(self, model: nn.Module, ctx: Context) -> Outcome:
        assert self.cal is not None
        fakes = {fqn: model.get_submodule(fqn) for fqn in self.fusions}
        grids_in: dict[str, QuantGrid] = {}
        grids_out: dict[str, QuantGrid] = {}
        scales: dict[str, torch.Tensor] = {}
        for fqn, fake in fakes.items():
            assert isinstance(fake, FakeQuantLayer)
            grids_out[fqn] = fake.grid("output")
            scales[fqn] = fake.weight_scale.detach().abs()
            parent, _, child = fqn.rpartition(".")
            setattr(model.get_submodule(parent), child, fake.as_fused())
        for fqn, fake in fakes.items():
            assert isinstance(fake, FakeQuantLayer)
            source = self.cal.sources.get(fqn)
            grids_in[fqn] = grids_out[source] if source is not None else fake.grid("input")
        cal = dataclasses.replace(self.cal, inputs=grids_in, outputs=grids_out)
        replaced = to_qdq(model, self.fusions, cal, self.cfg.weight_bits, self.cfg.activation_bits,
                          weight_scales=scales if self.cfg.estimator == "lsq" else None)
        absorbed = [f for fusion in self.fusions.values() for f in fusion.absorbed()]
        return Outcome(model=model, touched=replaced, structure={f: {} for f in (*replaced, *absorbed)},
                       stats={"layers": len(replaced)})

    def state_dict(self) -> dict[str, Any]:
        return {}
