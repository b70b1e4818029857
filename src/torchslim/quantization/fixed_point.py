"""Qm.n fixed-point weights and activations with integer-only layer arithmetic."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar

import torch
from torch import nn

from torchslim.core import (
    Context,
    HookSet,
    MethodConfig,
    Outcome,
    calibration_inputs,
    check,
    register,
    select,
    surgery,
)
from torchslim.core.layerwise import run_batches
from torchslim.errors import UnsupportedModuleError
from torchslim.quantization.fixed import FixedPointConv2d, FixedPointLinear, frac_bits_for

__all__ = ["FixedPointConfig", "apply", "calibrate_ranges"]

logger = logging.getLogger(__name__)
_NAME = "quantization.fixed_point"


@dataclasses.dataclass(frozen=True, kw_only=True)
class FixedPointConfig(MethodConfig):
    """Run Linear / Conv2d layers in Qm.n fixed point: integer weights, inputs and outputs.

    Paper: Gupta, Agrawal, Gopalakrishnan & Narayanan, "Deep Learning with Limited Numerical
    Precision", ICML 2015, https://arxiv.org/abs/1502.02551

    Args:
        total_bits: Word length ``m + n`` including the sign, 2..16 (weights are stored as
            int8 up to 8 bits, int16 above).
        frac_bits: Fractional bits ``n`` for weights, inputs and outputs of every layer, 0..24;
            None chooses them per layer: for the weights from their largest ``|w|``, for the
            inputs and outputs from the largest ``|x|`` seen on calibration data.
        batches: Calibration batches read from ``ctx.calib_data`` (when ``frac_bits`` is None).
        targets: Layer selectors: an fqn, ``re:<regex>`` or ``type:<ClassName>``.
        ignore: Selectors removed from ``targets``.

    Recipe:
        - method: quantization.fixed_point
          total_bits: 8
          frac_bits: null

    Notes:
        Each selected layer becomes a ``FixedPointLinear`` / ``FixedPointConv2d``: the input is
        rounded to nearest into Q(input_frac) and saturated, the integers are multiplied and
        accumulated exactly (an int8 GEMM with int32 accumulation up to 8 bits, int64 above),
        the bias is added as an integer at the accumulator's precision, and an arithmetic
        right shift with rounding brings the sum to Q(output_frac), saturated to
        ``total_bits``. The float result equals that of the same rounding done in exact
        arithmetic. Everything between the layers (BatchNorm, activations, pooling) stays
        float. Automatic formats are the most fractional bits that hold the observed maximum
        (clamped to -8..24); values beyond it at run time saturate. The paper trains with
        stochastic rounding; this is post-training round-to-nearest, so below about 8 bits
        accuracy drops (see the fixed-point benchmark). Convolutions with string padding,
        tied weights and Linear subclasses read by their owners stay float.
    """

    name: ClassVar[str] = _NAME
    total_bits: int = 8
    frac_bits: int | None = None
    batches: int = 8
    targets: tuple[str, ...] = ("type:Linear", "type:Conv2d")
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check(_is_int(self.total_bits) and 2 <= self.total_bits <= 16,
              f"{_NAME}: total_bits must be an integer in 2..16; found {self.total_bits!r}")
        check(self.frac_bits is None or (_is_int(self.frac_bits) and 0 <= self.frac_bits <= 24),
              f"{_NAME}: frac_bits must be null (chosen per layer) or an integer in 0..24; "
              f"found {self.frac_bits!r}")
        check(_is_int(self.batches) and self.batches >= 1,
              f"{_NAME}: batches must be an integer >= 1; found {self.batches!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@torch.no_grad()
def calibrate_ranges(model: nn.Module, layers: dict[str, nn.Module],
                     inputs: list[Any]) -> dict[str, list[float]]:
    """Largest ``|input|`` and ``|output|`` of each layer over ``inputs``: fqn -> [in, out]."""
    ranges = {fqn: [0.0, 0.0] for fqn in layers}

    def hook(fqn: str) -> Any:
        def record(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            seen = ranges[fqn]
            seen[0] = max(seen[0], float(args[0].detach().abs().max()))
            seen[1] = max(seen[1], float(output.detach().abs().max()))
        return record

    with HookSet() as hooks:
        for fqn, module in layers.items():
            hooks.forward(module, hook(fqn))
        run_batches(model, inputs)
    return ranges


def _formats(cfg: FixedPointConfig, layers: dict[str, nn.Module], ranges: dict[str, list[float]] | None
             ) -> dict[str, dict[str, int]]:
    formats = {}
    for fqn, layer in layers.items():
        weight = layer.weight
        assert isinstance(weight, torch.Tensor)
        if ranges is None:
            assert cfg.frac_bits is not None
            wf = inf = outf = cfg.frac_bits
        else:
            wf = frac_bits_for(float(weight.detach().abs().max()), cfg.total_bits)
            inf = frac_bits_for(ranges[fqn][0], cfg.total_bits)
            outf = frac_bits_for(ranges[fqn][1], cfg.total_bits)
        formats[fqn] = {"weight_frac": wf, "input_frac": inf, "output_frac": min(outf, wf + inf)}
    return formats


def _fixed_layer(layer: nn.Module, total_bits: int, fmt: dict[str, int]) -> nn.Module:
    bias = layer.bias is not None
    new: FixedPointLinear | FixedPointConv2d
    if isinstance(layer, nn.Linear):
        new = FixedPointLinear(layer.in_features, layer.out_features, bias, total_bits, **fmt)
    else:
        assert isinstance(layer, nn.Conv2d)
        new = FixedPointConv2d(layer.in_channels, layer.out_channels, layer.kernel_size,  # type: ignore[arg-type]
                               layer.stride, layer.padding, layer.dilation, layer.groups,  # type: ignore[arg-type]
                               bias, total_bits, **fmt)
    weight = layer.weight
    assert isinstance(weight, torch.Tensor)
    new.set_float(weight, layer.bias)
    return new.to(weight.device).train(layer.training)


@register(FixedPointConfig)
def apply(model: nn.Module, cfg: FixedPointConfig, ctx: Context) -> Outcome:
    """Replace each selected Linear / Conv2d by its fixed-point version."""
    selected = select(model, cfg.targets, cfg.ignore)
    chosen = surgery.plain_layers(model, selected, (nn.Linear, nn.Conv2d), _NAME, "stay float")
    string_padded = [f for f, m in chosen.items() if isinstance(getattr(m, "padding", None), str)]
    if string_padded:
        logger.warning("%s: convolutions with string padding stay float: %s", _NAME, ", ".join(string_padded))
    layers = {f: m for f, m in chosen.items() if f not in string_padded}
    if not layers:
        raise UnsupportedModuleError(
            f"{_NAME}: expected at least one plain, untied nn.Linear / nn.Conv2d selected by targets "
            f"{list(cfg.targets)} minus ignore {list(cfg.ignore)}; found none in {type(model).__name__}")
    ranges = None
    if cfg.frac_bits is None:
        weight = next(iter(layers.values())).weight
        assert isinstance(weight, torch.Tensor)
        ranges = calibrate_ranges(model, layers, calibration_inputs(ctx, cfg.batches, _NAME, weight.device))
    formats = _formats(cfg, layers, ranges)
    replaced = surgery.replace_modules(model, list(layers.items()),
                                       lambda fqn, m: _fixed_layer(m, cfg.total_bits, formats[fqn]))
    return Outcome(model=model, touched=replaced, structure={f: {} for f in replaced},
                   stats={"total_bits": cfg.total_bits, "layers": len(replaced)},
                   layers={f: {"total_bits": cfg.total_bits, **formats[f]} for f in replaced})
