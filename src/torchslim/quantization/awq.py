"""AWQ: activation-aware scaling of weight columns before low-bit rounding, block by block."""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar

import torch
from torch import nn

from torchslim.core import Context, MethodConfig, Outcome, calibration_inputs, check, register, surgery
from torchslim.core.layerwise import BlockStep, layerwise
from torchslim.quantization._clip import search_clip
from torchslim.quantization.embedding import quantize_embeddings
from torchslim.quantization.packed import WeightOnlyLinear, dequantize_groups, quantize_groups
from torchslim.quantization.weight_only import (
    check_bits_and_group,
    embedding_plan,
    group_size_for,
    quantizable_linears,
    weight_only_outcome,
)

__all__ = ["AWQConfig", "InputSample", "apply", "awq_search"]

logger = logging.getLogger(__name__)
_NAME = "quantization.awq"


@dataclasses.dataclass(frozen=True, kw_only=True)
class AWQConfig(MethodConfig):
    """Scale up the weight columns that meet large activations before rounding, then divide them back.

    Paper: Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and
    Acceleration", MLSys 2024, https://arxiv.org/abs/2306.00978

    Args:
        bits: Bits per weight, 2..8.
        group_size: Input columns sharing one scale and zero point; 0: one group per row.
        symmetric: Zero point fixed at the middle code; False fits each group's range.
        grid: Exponents ``alpha`` tried in [0, 1] for the column scales ``s = mean|x|^alpha``.
        sample_rows: Input rows (tokens) per layer kept to score each ``alpha``.
        clip_shrink: After the scales, each group's range may shrink by up to this fraction
            (AWQ's clip search): 21 factors, 1 down to ``1 - clip_shrink`` in 20 steps, are tried
            per row and group, and the one with the least output error on the sampled inputs is
            kept; 0: full min..max ranges.
        batches: Calibration batches read from ``ctx.calib_data``.
        targets: Layer selectors: an fqn, ``re:<regex>`` or ``type:<ClassName>``.
        ignore: Selectors removed from ``targets``.
        embedding_bits: Also round every ``nn.Embedding`` table (and a tied ``lm_head``) to
            packed codes of this width, as ``quantization.weight_only`` does; 0 keeps them float.

    Recipe:
        - method: quantization.awq
          bits: 4
          group_size: 64
          clip_shrink: 0.2

    Notes:
        Per layer, the ``alpha`` with the smallest output error on the sampled calibration
        inputs wins (alpha 0 is plain round-to-nearest, so AWQ never does worse than RTN on
        them). The column scales are kept as a per-input division inside the packed layer
        (``WeightOnlyLinear.input_scale``) rather than folded into the preceding norm, so any
        Linear qualifies, at the cost of one elementwise division per call. Calibration runs
        block by block with the KV cache off; peak memory is the model plus one block's
        activations. Needs ``ctx.calib_data``.
    """

    name: ClassVar[str] = _NAME
    bits: int = 4
    group_size: int = 64
    symmetric: bool = False
    grid: int = 20
    sample_rows: int = 1024
    clip_shrink: float = 0.0
    batches: int = 128
    targets: tuple[str, ...] = ("type:Linear",)
    ignore: tuple[str, ...] = ()
    embedding_bits: int = 0

    def __post_init__(self) -> None:
        check_bits_and_group(_NAME, self.bits, self.group_size, self.embedding_bits)
        check(self.grid >= 1 and self.sample_rows >= 1 and self.batches >= 1,
              f"{_NAME}: grid, sample_rows and batches must be >= 1")
        check(0 <= self.clip_shrink < 1,
              f"{_NAME}: clip_shrink must be in [0, 1); found {self.clip_shrink!r}")


class InputSample:
    """Mean absolute input per channel, and an evenly spread sample of input rows."""

    def __init__(self, features: int, rows: int) -> None:
        self.abs_sum = torch.zeros(features, dtype=torch.float64)
        self.count, self.limit = 0, rows
        self.rows: list[torch.Tensor] = []

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).float().cpu()
        self.abs_sum += flat.abs().sum(0).double()
        self.count += flat.shape[0]
        self.rows.append(flat[:: max(flat.shape[0] // 64, 1)][:64])  # up to 64 rows per call

    def sample(self) -> torch.Tensor:
        rows = torch.cat(self.rows)
        return rows[torch.linspace(0, len(rows) - 1, min(self.limit, len(rows))).long()]


@torch.no_grad()
def awq_search(weight: torch.Tensor, mean_abs: torch.Tensor, x: torch.Tensor, *, bits: int, group_size: int,
               symmetric: bool, grid: int) -> tuple[torch.Tensor, float]:
    """The column scales (in,) with the least output error on ``x``, and the chosen ``alpha``."""
    w = weight.detach().float()
    reference = x @ w.T
    best: tuple[float, torch.Tensor, float] | None = None
    for i in range(grid):
        alpha = i / grid
        s = mean_abs.float().clamp_min(1e-8).pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        q = dequantize_groups(*quantize_groups(w * s, bits, group_size, symmetric)) / s
        err = float((x @ q.T - reference).pow(2).mean())
        if best is None or err < best[0]:
            best = (err, s, alpha)
    assert best is not None
    return best[1], best[2]


def _quantize_layer(module: nn.Module, stat: InputSample, cfg: AWQConfig,
                    group: int) -> tuple[WeightOnlyLinear, float]:
    assert isinstance(module, nn.Linear)
    x = stat.sample()
    s, alpha = awq_search(module.weight, stat.abs_sum / stat.count, x, bits=cfg.bits,
                          group_size=group, symmetric=cfg.symmetric, grid=cfg.grid)
    scaled = module.weight.detach().float() * s
    clip = None
    if cfg.clip_shrink:
        x = x / s  # the scaled weight meets the inputs divided by s
        clip = search_clip(scaled, x.T @ x, bits=cfg.bits, group_size=group, symmetric=cfg.symmetric,
                           shrink=cfg.clip_shrink)
    codes, scale, zero = quantize_groups(scaled, cfg.bits, group, cfg.symmetric, clip)
    layer = WeightOnlyLinear.from_codes(codes, scale, zero, cfg.bits, module.bias, s)
    return layer.to(module.weight.device).train(module.training), alpha


@register(AWQConfig)
def apply(model: nn.Module, cfg: AWQConfig, ctx: Context) -> Outcome:
    """Search column scales per layer on calibration inputs, then round to packed codes."""
    tables = embedding_plan(model, cfg.embedding_bits, cfg.group_size, _NAME)
    layers = quantizable_linears(model, cfg.targets, cfg.ignore, _NAME, tables)
    groups = {f: group_size_for(f, m.in_features, cfg.group_size, _NAME) for f, m in layers.items()}
    alphas: dict[str, float] = {}

    def quantize(step: BlockStep) -> None:
        made = {}
        for fqn, module in step.layers.items():
            if fqn not in step.stats:
                logger.warning("%s: %s never received an input during calibration; left float", _NAME, fqn)
                continue
            made[fqn], alphas[fqn] = _quantize_layer(module, step.stats[fqn], cfg, groups[fqn])
        surgery.replace_modules(model, [(f, layers[f]) for f in made], lambda f, _: made[f])

    if layers:
        outside = layerwise(model, calibration_inputs(ctx, cfg.batches, _NAME), layers=layers,
                            new_stat=lambda f, m: InputSample(layers[f].in_features, cfg.sample_rows),
                            on_block=quantize)
        if outside:
            logger.warning("%s: %d selected layer(s) outside the repeated blocks stay float: %s",
                           _NAME, len(outside), ", ".join(outside))
    return weight_only_outcome(model, cfg.bits, cfg.group_size, {f: groups[f] for f in alphas},
                               quantize_embeddings(model, tables, cfg.embedding_bits, cfg.symmetric),
                               {f: {"alpha": a} for f, a in alphas.items()})
