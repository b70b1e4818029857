"""Static post-training int8 quantization, lowered to ONNX QDQ for ONNX Runtime's int8 kernels."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, ClassVar

from torch import nn

from torchslim.core import Context, MethodConfig, Outcome, calibration_inputs, check, register
from torchslim.quantization._bias import correct_biases
from torchslim.quantization._static import calibrate, fuse, renamed, round_module_outputs, to_qdq
from torchslim.quantization.observers import OBSERVERS

__all__ = ["PTQConfig", "apply", "check_static_bits"]

_NAME = "quantization.ptq"


def check_static_bits(name: str, weight_bits: int, activation_bits: int) -> None:
    """Both widths in 2..8 (int8 containers; 8 is the width ONNX Runtime runs natively)."""
    for field, value in (("weight_bits", weight_bits), ("activation_bits", activation_bits)):
        check(isinstance(value, int) and 2 <= value <= 8,
              f"{name}: {field} must be an integer in 2..8 (stored in int8/uint8); found {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PTQConfig(MethodConfig):
    """Fold BatchNorm, fuse ReLU, then fix int8 weights and uint8 activation grids from calibration data.

    Paper: Jacob et al., "Quantization and Training of Neural Networks for Efficient
    Integer-Arithmetic-Only Inference", CVPR 2018, https://arxiv.org/abs/1712.05877;
    histogram observer: Migacz, "8-bit Inference with TensorRT", GTC 2017 (KL calibration);
    bias correction: Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias
    Correction", ICCV 2019, https://arxiv.org/abs/1906.04721.

    Args:
        weight_bits: Bits per weight, 2..8: symmetric, one scale per output channel.
        activation_bits: Bits per activation, 2..8: asymmetric (scale and zero point).
        observer: How each activation range is chosen: ``minmax`` (extremes), ``percentile``
            (drops the ``percentile`` tails), ``mse`` (smallest rounding error) or
            ``histogram`` (smallest KL divergence, as TensorRT; it clips hard: on the bundled
            ``fashion_cnn`` it cut post-ReLU ranges 8x and lost 2 points where ``mse`` lost 0.1).
        percentile: The share of values kept by the ``percentile`` observer, in (50, 100].
        batches: Calibration batches read from ``ctx.calib_data``.
        targets: Layer selectors: an fqn, ``re:<regex>`` or ``type:<ClassName>``.
        ignore: Selectors removed from ``targets`` (they stay float).
        bias_correction: After rounding, shift each layer's int32 bias, layer by layer, so its
            mean output per channel on the calibration data equals the float layer's (Nagel
            et al. 2019, measured means). Costs a float copy of the model and one pass over
            the calibration data per layer (each stopped at that layer); see
            docs/benchmarks/quantization-static.md for what it recovers.
        round_outputs: A layer whose input is the output of another module (a residual
            block's sum, as in MobileNetV2 and ResNet) gets that module wrapped in a
            ``RoundedOutput``: the sum is rounded once to the layer's input grid and every
            reader, the next residual add included, uses those int8 values. ONNX Runtime then
            runs the adds as ``QLinearAdd`` in uint8 instead of float between Dequantize and
            Quantize nodes (ONNX Runtime's own ``quantize_static`` does the same). False keeps
            the sums float and rounds them only where a layer reads them.

    Recipe:
        - method: quantization.ptq
          weight_bits: 8
          activation_bits: 8
          observer: mse
          bias_correction: true
          round_outputs: true   # residual sums in uint8 (the default)

    Notes:
        Each selected ``Conv2d`` / ``Linear`` whose output goes straight into a BatchNorm and a
        ReLU/ReLU6 (found by tracing the model with ``torch.fx``, or in an ``nn.Sequential`` when it
        cannot be traced) becomes one ``QDQConv2d`` / ``QDQLinear`` whose output grid starts at 0.
        The model runs in int8 where it is deployed: ``torchslim export --format onnx`` writes
        QuantizeLinear/DequantizeLinear nodes that ONNX Runtime fuses into QLinearConv /
        QGemm int8 kernels; the report's deployment table measures that engine. A layer whose
        input only max-pools or flattens the previous layer's output reuses that layer's grid,
        so max-pooling and residual adds between int8 layers run in uint8 there too
        (NhwcMaxPool, QLinearAdd) with no extra rounding. In PyTorch the layers compute, in
        inference, what ONNX Runtime's int8 kernels compute, code for code (exact int32
        accumulators, its float32 requantization and QLinearAdd formulas; a reference, not a
        fast kernel); with gradients, and when exported, they run the float QDQ form. Layers of
        other types, and BatchNorms not directly after a selected layer, stay float (the layers
        are listed in a warning). Needs ``ctx.calib_data``; follow with ``quantization.qat`` if
        the accuracy loss is too large.
    """

    name: ClassVar[str] = _NAME
    weight_bits: int = 8
    activation_bits: int = 8
    observer: str = "mse"
    percentile: float = 99.99
    batches: int = 32
    targets: tuple[str, ...] = ("type:Conv2d", "type:Linear")
    ignore: tuple[str, ...] = ()
    bias_correction: bool = False
    round_outputs: bool = True

    def __post_init__(self) -> None:
        check_static_bits(_NAME, self.weight_bits, self.activation_bits)
        check(self.observer in OBSERVERS, f"{_NAME}: observer must be one of {list(OBSERVERS)}; "
                                          f"found {self.observer!r}")
        check(50 < self.percentile <= 100,
              f"{_NAME}: percentile must be in (50, 100]; found {self.percentile!r}")
        check(self.batches >= 1, f"{_NAME}: batches must be >= 1; found {self.batches!r}")


@register(PTQConfig)
def apply(model: nn.Module, cfg: PTQConfig, ctx: Context) -> Outcome:
    """Fuse, calibrate on ``ctx.calib_data`` and swap the layers for their QDQ forms."""
    batches = calibration_inputs(ctx, cfg.batches, _NAME)
    fusions = fuse(model, cfg.targets, cfg.ignore, _NAME)
    cal = calibrate(model, fusions, batches, cfg.observer, cfg.activation_bits, cfg.percentile,
                    round_outputs=cfg.round_outputs)
    reference = copy.deepcopy(model).eval() if cfg.bias_correction else None  # the fused float model
    replaced = to_qdq(model, fusions, cal, cfg.weight_bits, cfg.activation_bits)
    renames = round_module_outputs(model, cal, cfg.activation_bits)
    if reference is not None:
        training = model.training
        names = {f: renamed(f, renames) for f in fusions}
        correct_biases(model.eval(), reference, list(fusions), batches, names)
        model.train(training)
    replaced = tuple(renamed(f, renames) for f in replaced)
    absorbed = [renamed(f, renames) for fusion in fusions.values() for f in fusion.absorbed()]
    structure: dict[str, dict[str, Any]] = {f: {"wrap": True} for f in cal.rounded}
    structure.update({f: {} for f in (*replaced, *absorbed)})
    return Outcome(
        model=model, touched=(*replaced, *cal.rounded), structure=structure,
        stats={"layers": len(replaced), "fused_batchnorms": sum(f.norm is not None for f in fusions.values()),
               "fused_activations": sum(f.activation != "none" for f in fusions.values()),
               "bias_corrected": len(fusions) if cfg.bias_correction else 0,
               "rounded_outputs": len(cal.rounded)},
        layers={renamed(f, renames): {"input_scale": round(cal.inputs[f].scale, 6),
                                      "output_scale": round(cal.outputs[f].scale, 6)} for f in fusions})
