"""Round-to-nearest weight-only quantization to packed low-bit codes (int8 down to int2)."""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar, cast

import torch
from torch import nn

from torchslim.core import Context, MethodConfig, Outcome, check, register, select, surgery
from torchslim.errors import ConfigError
from torchslim.quantization.packed import WeightOnlyLinear, quantize_groups

__all__ = ["WeightOnlyConfig", "apply", "check_bits_and_group", "group_size_for", "quantizable_linears"]

logger = logging.getLogger(__name__)
_NAME = "quantization.weight_only"


@dataclasses.dataclass(frozen=True, kw_only=True)
class WeightOnlyConfig(MethodConfig):
    """Store Linear weights as packed 2- to 8-bit codes with one scale per group of inputs.

    Paper: Dettmers & Zettlemoyer, "The case for 4-bit precision: k-bit Inference Scaling
    Laws", ICML 2023, https://arxiv.org/abs/2212.09720 (group-wise round-to-nearest)

    Args:
        bits: Bits per weight, 2..8 (int4 is the usual LLM choice).
        group_size: Input columns sharing one scale and zero point (32, 64, 128); 0 gives one
            group per output row. A layer narrower than the group is one group per row.
        symmetric: Zero point fixed at the middle code (scale from ``max |w|``); False fits
            each group's min..max (asymmetric, more accurate at 4 bits and below).
        targets: Layer selectors: an fqn, ``re:<regex>`` or ``type:<ClassName>``.
        ignore: Selectors removed from ``targets``.

    Recipe:
        - method: quantization.weight_only
          bits: 4
          group_size: 64
          ignore: ["lm_head"]

    Notes:
        No calibration data: each weight is rounded to its nearest code. The weights are
        stored packed (two 4-bit codes per byte; 3- and 2-bit codes also take a nibble), so
        the saved file really shrinks (int4 g64: about 0.16 of fp32 per Linear); the layer
        dequantises block by block on the fly and multiplies in float. A ``group_size`` that
        does not divide a layer's input width is an error naming the layer. Tied weights and
        Linear subclasses read by their owners (``nn.MultiheadAttention.out_proj``) stay
        float, listed in a warning. ``quantization.gptq`` and ``quantization.awq`` produce
        the same packed layers with less error, from calibration data. Exported to ONNX, 4- and
        8-bit layers whose groups are a power of two of at least 16 become ONNX Runtime's
        ``com.microsoft.MatMulNBits`` on the packed codes; other widths export as float.
    """

    name: ClassVar[str] = _NAME
    bits: int = 4
    group_size: int = 64
    symmetric: bool = False
    targets: tuple[str, ...] = ("type:Linear",)
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_bits_and_group(_NAME, self.bits, self.group_size)


def check_bits_and_group(name: str, bits: int, group_size: int) -> None:
    """The ``bits`` and ``group_size`` rules every weight-only method shares."""
    check(2 <= bits <= 8, f"{name}: bits must be an integer in 2..8; found {bits!r}")
    check(group_size >= 0, f"{name}: group_size must be >= 0 (0: one group per row); found {group_size!r}")


def group_size_for(fqn: str, in_features: int, group_size: int, name: str = _NAME) -> int:
    """The group width used for a layer; a size that does not divide the layer is an error."""
    if group_size == 0 or group_size >= in_features:
        return in_features
    if in_features % group_size:
        raise ConfigError(f"{name}: group_size {group_size} does not divide the input width {in_features} "
                          f"of layer {fqn!r}; choose a divisor (e.g. 32 or 64) or ignore the layer")
    return group_size


def quantizable_linears(model: nn.Module, targets: tuple[str, ...], ignore: tuple[str, ...],
                        name: str = _NAME) -> dict[str, nn.Linear]:
    """Selected plain, untied ``nn.Linear`` layers; the others are listed in a warning."""
    chosen = surgery.plain_layers(model, select(model, targets, ignore), (nn.Linear,), name, "stay float")
    return cast("dict[str, nn.Linear]", chosen)


@register(WeightOnlyConfig)
def apply(model: nn.Module, cfg: WeightOnlyConfig, ctx: Context) -> Outcome:
    """Replace each selected Linear by a ``WeightOnlyLinear`` with round-to-nearest codes."""
    layers = quantizable_linears(model, cfg.targets, cfg.ignore)
    groups = {fqn: group_size_for(fqn, m.in_features, cfg.group_size) for fqn, m in layers.items()}

    def build(fqn: str, module: nn.Module) -> nn.Module:
        assert isinstance(module, nn.Linear)
        with torch.no_grad():
            codes, scale, zero = quantize_groups(module.weight, cfg.bits, groups[fqn], cfg.symmetric)
            new = WeightOnlyLinear.from_codes(codes, scale, zero, cfg.bits, module.bias)
        return new.to(module.weight.device).train(module.training)

    replaced = surgery.replace_modules(model, list(layers.items()), build)
    return Outcome(model=model, touched=replaced, structure={f: {} for f in replaced},
                   stats={"bits": cfg.bits, "group_size": cfg.group_size, "layers": len(replaced)},
                   layers={f: {"bits": cfg.bits, "group_size": groups[f]} for f in replaced})
