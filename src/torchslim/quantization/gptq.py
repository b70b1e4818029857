"""GPTQ: one-shot weight-only quantization with second-order error compensation, block by block."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar

import torch
from torch import nn

from torchslim.core import Context, MethodConfig, Outcome, calibration_inputs, check, register, surgery
from torchslim.core.layerwise import BlockStep, InputGram, layerwise
from torchslim.errors import DataError
from torchslim.quantization._gptq import gptq_quantize, search_scales
from torchslim.quantization.embedding import quantize_embeddings
from torchslim.quantization.packed import WeightOnlyLinear
from torchslim.quantization.weight_only import (
    check_bits_and_group,
    embedding_plan,
    group_size_for,
    quantizable_linears,
    weight_only_outcome,
)

__all__ = ["GPTQConfig", "apply", "gptq_layers"]

logger = logging.getLogger(__name__)
_NAME = "quantization.gptq"


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTQConfig(MethodConfig):
    """Quantize weights column by column, pushing each rounding error onto the columns left.

    Paper: Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
    Pre-trained Transformers", ICLR 2023, https://arxiv.org/abs/2210.17323

    Args:
        bits: Bits per weight, 2..8.
        group_size: Input columns sharing one scale and zero point; 0: one group per row.
        symmetric: Zero point fixed at the middle code; False fits each group's range.
        act_order: Quantize columns in order of decreasing input energy (``diag(H)``), with
            group scales fixed beforehand from the original weight (static groups).
        damping: Added to the Hessian's diagonal, relative to its mean.
        block_size: Columns quantized together before the rest are updated (speed only).
        scale_grid: AWQ and GPTQ combined: before GPTQ, each layer's weight columns are scaled
            by ``s = rms(x)^alpha`` (``alpha`` among ``scale_grid`` points in [0, 1), chosen by
            the output error on the calibration inputs, 0 included), GPTQ rounds ``W * s`` and
            the layer divides its inputs by ``s`` (``WeightOnlyLinear.input_scale``); 0: plain GPTQ.
        clip_shrink: Largest fraction by which a group's range may shrink: 21 factors, in 20
            equal steps from 1 down to ``1 - clip_shrink``, are tried per row and group, and the
            one with the least output error on the calibration inputs (``e H_gg e^T`` over the
            group's block of the Hessian) sets the group's scale; 0 keeps each group's full
            min..max range.
        batches: Calibration batches read from ``ctx.calib_data``.
        targets: Layer selectors: an fqn, ``re:<regex>`` or ``type:<ClassName>``.
        ignore: Selectors removed from ``targets``.
        embedding_bits: Also round every ``nn.Embedding`` table (and a tied ``lm_head``) to
            packed codes of this width, as ``quantization.weight_only`` does; 0 keeps them float.

    Recipe:
        - method: quantization.gptq
          bits: 4
          group_size: 64
          act_order: true
          clip_shrink: 0.2      # search each group's clipping range
          scale_grid: 20        # AWQ's column scales before GPTQ

    Notes:
        Calibration runs block by block (``torchslim.core.layerwise``): each decoder layer's
        Linears see the inputs that the already quantized layers before them produce, with the
        KV cache off, and peak memory stays near the model plus one block's activations. The
        result is the same packed ``WeightOnlyLinear`` as ``quantization.weight_only`` (int4:
        two codes per byte, dequantised on the fly). Tied weights (a tied ``lm_head``) and
        Linear subclasses stay float with a warning; a ``group_size`` that does not divide a
        layer is an error naming it. Needs ``ctx.calib_data`` (never the evaluation text).
    """

    name: ClassVar[str] = _NAME
    bits: int = 4
    group_size: int = 64
    symmetric: bool = False
    act_order: bool = True
    damping: float = 0.01
    block_size: int = 128
    clip_shrink: float = 0.0
    scale_grid: int = 0
    batches: int = 128
    targets: tuple[str, ...] = ("type:Linear",)
    ignore: tuple[str, ...] = ()
    embedding_bits: int = 0

    def __post_init__(self) -> None:
        check_bits_and_group(_NAME, self.bits, self.group_size, self.embedding_bits)
        check(0 <= self.clip_shrink < 1,
              f"{_NAME}: clip_shrink must be in [0, 1); found {self.clip_shrink!r}")
        check(self.scale_grid >= 0, f"{_NAME}: scale_grid must be >= 0 (0: no column scales); "
                                    f"found {self.scale_grid!r}")
        check(self.damping >= 0, f"{_NAME}: damping must be >= 0; found {self.damping!r}")
        check(self.block_size >= 1 and self.batches >= 1,
              f"{_NAME}: block_size and batches must be >= 1; found {self.block_size}, {self.batches}")


def _gram(fqn: str, module: nn.Module) -> InputGram:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return InputGram(int(weight.shape[1]), weight.device)


@register(GPTQConfig)
def apply(model: nn.Module, cfg: GPTQConfig, ctx: Context) -> Outcome:
    """Quantize every selected Linear with GPTQ, one block of the model at a time."""
    tables = embedding_plan(model, cfg.embedding_bits, cfg.group_size, _NAME)
    layers = quantizable_linears(model, cfg.targets, cfg.ignore, _NAME, tables)
    groups = {fqn: group_size_for(fqn, m.in_features, cfg.group_size, _NAME) for fqn, m in layers.items()}
    done: tuple[str, ...] = ()
    if layers:
        done = gptq_layers(model, layers, {f: cfg.bits for f in layers}, groups, cfg,
                           calibration_inputs(ctx, cfg.batches, _NAME), _NAME)
    else:
        logger.warning("%s: no selected plain nn.Linear with an untied weight; no GPTQ", _NAME)
    return weight_only_outcome(model, cfg.bits, cfg.group_size, {f: groups[f] for f in done},
                               quantize_embeddings(model, tables, cfg.embedding_bits, cfg.symmetric))


def gptq_layers(model: nn.Module, layers: dict[str, nn.Linear], bits: dict[str, int], groups: dict[str, int],
                cfg: GPTQConfig, batches: list[Any], who: str) -> tuple[str, ...]:
    """GPTQ every layer of ``layers`` at its own ``bits[fqn]``, decoder block by block; returns the
    fqns replaced by ``WeightOnlyLinear`` (``cfg`` gives the GPTQ settings; its ``bits`` is unused)."""
    done: list[str] = []

    def quantize(step: BlockStep) -> None:
        made = {}
        for fqn, module in step.layers.items():
            if fqn not in step.stats:
                logger.warning("%s: %s never received an input during calibration; left float", who, fqn)
                continue
            hessian = step.stats[fqn].hessian()
            if not torch.isfinite(hessian).all():
                raise DataError(f"{who}: the calibration inputs of {fqn} contain NaN or inf")
            assert isinstance(module, nn.Linear)
            weight, columns = module.weight.detach(), None
            if cfg.scale_grid:  # AWQ's column scales first; GPTQ then rounds W * s against s^-1 H s^-1
                columns = search_scales(weight, hessian, bits=bits[fqn], group_size=groups[fqn],
                                        symmetric=cfg.symmetric, grid=cfg.scale_grid).to(weight.device)
                weight = weight * columns
                hessian = hessian / torch.outer(columns, columns).to(hessian.dtype)
            codes, scale, zero = gptq_quantize(weight, hessian, bits=bits[fqn], group_size=groups[fqn],
                                               symmetric=cfg.symmetric, act_order=cfg.act_order,
                                               damping=cfg.damping, block_size=cfg.block_size,
                                               clip_shrink=cfg.clip_shrink)
            made[fqn] = WeightOnlyLinear.from_codes(codes, scale, zero, bits[fqn], module.bias, columns).to(
                module.weight.device).train(module.training)
        done.extend(surgery.replace_modules(model, [(f, layers[f]) for f in made], lambda f, _: made[f]))

    outside = layerwise(model, batches, layers=layers, new_stat=_gram, on_block=quantize)
    if outside:
        logger.warning("%s: %d selected layer(s) lie outside the model's repeated blocks and stay float "
                       "(select them alone in a second method to quantize them): %s",
                       who, len(outside), ", ".join(outside))
    return tuple(done)
