"""Round-to-nearest weight-only quantization to packed low-bit codes (int8 down to int2)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any, ClassVar, cast

import torch
from torch import nn

from torchslim.core import Context, MethodConfig, Outcome, check, register, select, surgery
from torchslim.errors import ConfigError
from torchslim.quantization.embedding import embedding_groups, quantize_embeddings, tied_heads
from torchslim.quantization.packed import WeightOnlyLinear, quantize_groups

__all__ = ["WeightOnlyConfig", "apply", "check_bits_and_group", "embedding_plan", "group_size_for",
           "quantizable_linears", "weight_only_outcome"]

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
        embedding_bits: Also store every ``nn.Embedding`` table as packed codes of this width
            (round to nearest, same groups), with a tied ``lm_head`` sharing its codes; 0
            keeps embeddings float. 8 is nearly lossless and takes a tied LLM's checkpoint
            below 30% of fp32 at int4 (SmolLM2's table is 21% of its parameters).

    Recipe:
        - method: quantization.weight_only
          bits: 4
          group_size: 64
          ignore: ["lm_head"]
        - method: quantization.weight_only   # int4 Linears, int8 tied embedding and head
          bits: 4
          embedding_bits: 8

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
    embedding_bits: int = 0

    def __post_init__(self) -> None:
        check_bits_and_group(_NAME, self.bits, self.group_size, self.embedding_bits)


def check_bits_and_group(name: str, bits: int, group_size: int, embedding_bits: int = 0) -> None:
    """The ``bits``, ``group_size`` and ``embedding_bits`` rules every weight-only method shares."""
    check(2 <= bits <= 8, f"{name}: bits must be an integer in 2..8; found {bits!r}")
    check(embedding_bits == 0 or 2 <= embedding_bits <= 8,
          f"{name}: embedding_bits must be 0 (float embeddings) or an integer in 2..8; "
          f"found {embedding_bits!r}")
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
                        name: str = _NAME, tables: Mapping[str, int] | None = None) -> dict[str, nn.Linear]:
    """Selected plain, untied ``nn.Linear`` layers; the others are listed in a warning, except
    heads tied to the embeddings of ``tables`` (``embedding_plan``), which are quantized with them."""
    heads = tied_heads(model, dict(tables)) if tables else {}
    matches = [(f, m) for f, m in select(model, targets, ignore) if f not in heads]
    chosen = surgery.plain_layers(model, matches, (nn.Linear,), name, "stay float")
    return cast("dict[str, nn.Linear]", chosen)


@register(WeightOnlyConfig)
def apply(model: nn.Module, cfg: WeightOnlyConfig, ctx: Context) -> Outcome:
    """Replace each selected Linear by a ``WeightOnlyLinear`` with round-to-nearest codes."""
    tables = embedding_plan(model, cfg.embedding_bits, cfg.group_size, _NAME)
    layers = quantizable_linears(model, cfg.targets, cfg.ignore, _NAME, tables)
    groups = {fqn: group_size_for(fqn, m.in_features, cfg.group_size) for fqn, m in layers.items()}

    def build(fqn: str, module: nn.Module) -> nn.Module:
        assert isinstance(module, nn.Linear)
        with torch.no_grad():
            codes, scale, zero = quantize_groups(module.weight, cfg.bits, groups[fqn], cfg.symmetric)
            new = WeightOnlyLinear.from_codes(codes, scale, zero, cfg.bits, module.bias)
        return new.to(module.weight.device).train(module.training)

    replaced = surgery.replace_modules(model, list(layers.items()), build)
    return weight_only_outcome(model, cfg.bits, cfg.group_size, {f: groups[f] for f in replaced},
                               quantize_embeddings(model, tables, cfg.embedding_bits, cfg.symmetric))


def embedding_plan(model: nn.Module, bits: int, group_size: int, who: str) -> dict[str, int]:
    """The embeddings to quantize (``embedding_groups``) when ``bits`` (``embedding_bits``) is set;
    checked before any layer changes."""
    return embedding_groups(model, group_size, who) if bits else {}


def weight_only_outcome(model: nn.Module, bits: int, group_size: int, groups: dict[str, int],
                        tables: dict[str, dict[str, Any]], extra: dict[str, dict[str, Any]] | None = None,
                        ) -> Outcome:
    """The outcome of a weight-only method: Linears quantized at ``bits`` with their ``groups``, plus
    the embeddings (and tied heads) ``tables``; ``extra`` adds per-layer fields (AWQ's alpha)."""
    layers = {f: {"bits": bits, "group_size": g, **(extra or {}).get(f, {})} for f, g in groups.items()}
    layers.update(tables)
    stats: dict[str, float] = {"bits": bits, "group_size": group_size, "layers": len(groups)}
    if tables:
        stats["embeddings"] = sum("tied_to" not in v for v in tables.values())
    return Outcome(model=model, touched=tuple(layers), structure={f: {} for f in layers}, stats=stats,
                   layers=layers)
