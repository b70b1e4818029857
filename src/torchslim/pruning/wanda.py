"""Wanda: prune by |weight| x input-activation norm, per output row, layer by layer.

Each decoder block is calibrated on the outputs of the already pruned blocks before it
(``torchslim.core.layerwise``), so memory stays at the model plus one block's activations.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar

from torch import nn

from torchslim.core import Context, MethodConfig, Outcome, calibration_inputs, register, surgery
from torchslim.core.layerwise import BlockStep, InputNorms, layerwise
from torchslim.pruning._calibrated import (
    DEFAULT_TARGETS,
    check_common,
    finish,
    owl_allocation,
    parse_pattern,
    pruned_layers,
    row_mask,
    wanda_scores,
    warn_outside,
)
from torchslim.pruning._unstructured import weight_of
from torchslim.pruning.nm import nm_mask

__all__ = ["WandaPruningConfig", "apply"]

logger = logging.getLogger(__name__)

_NAME = "pruning.wanda"


@dataclasses.dataclass(frozen=True, kw_only=True)
class WandaPruningConfig(MethodConfig):
    """Zero the weights with the smallest ``|W_ij| * ||X_j||`` in each output row.

    Paper: Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large Language
    Models" (Wanda), ICLR 2024, https://arxiv.org/abs/2306.11695; optional outlier-weighed
    per-block sparsity from Yin et al., "Outlier Weighed Layerwise Sparsity (OWL)", ICML 2024,
    https://arxiv.org/abs/2310.05175

    Args:
        sparsity: Fraction of each output row's weights set to zero, in [0, 1) (unstructured).
        pattern: ``unstructured``, or ``N:M`` (``2:4``): keep the N best of every M consecutive
            inputs of each row; the sparsity is then 1 - N/M and ``sparsity`` is not used.
        owl: OWL's lambda: block sparsities average ``sparsity`` and span ``2 * owl``,
            lower where more scores are outliers; 0 prunes every block to ``sparsity``.
        owl_threshold: A score is an outlier above this multiple of its block's mean score.
        batches: Calibration batches used at most (from ``ctx.calib_data``, else
            ``ctx.train_data``): token-id tensors, ``{"input_ids": ...}`` dicts or
            ``(inputs, targets)`` pairs.
        targets: Layer selectors: an fqn, ``re:<regex>`` or ``type:<ClassName>``.
        ignore: Selectors removed from ``targets``.

    Recipe:
        - method: pruning.wanda
          sparsity: 0.5
          pattern: unstructured
          ignore: ["re:.*lm_head"]

    Notes:
        Blocks are the model's ``nn.ModuleList`` of same-class layers that it runs as a chain
        (a decoder stack); a model without one is calibrated as a single block. Only
        ``nn.Linear`` layers inside the blocks are pruned; the others, tied weights (an
        ``lm_head`` sharing the embedding) and layers never called with an input
        (``nn.MultiheadAttention.out_proj``) are skipped with a log line. The KV cache is
        turned off during calibration. Masks stay as parametrizations until the stage ends,
        so a ``train`` block in the same stage keeps the zeros. Dense kernels run no faster.
    """

    name: ClassVar[str] = _NAME
    sparsity: float = 0.5
    pattern: str = "unstructured"
    owl: float = 0.0
    owl_threshold: float = 5.0
    batches: int = 128
    targets: tuple[str, ...] = DEFAULT_TARGETS
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_common(self, _NAME)


@register(WandaPruningConfig)
def apply(model: nn.Module, cfg: WandaPruningConfig, ctx: Context) -> Outcome:
    """Mask each selected layer by Wanda scores, one decoder block at a time."""
    nm = parse_pattern(cfg.pattern, _NAME)
    if nm is not None and cfg.sparsity != 1 - nm[0] / nm[1]:
        logger.warning("%s: pattern %s sets the sparsity to %.3g; sparsity %.3g is not used",
                       _NAME, cfg.pattern, 1 - nm[0] / nm[1], cfg.sparsity)
    layers = pruned_layers(model, cfg, nm, _NAME)
    if not layers:
        logger.warning("%s: no selected nn.Linear layer with an untied weight; nothing to do", _NAME)
        return Outcome(model=model)
    inputs = calibration_inputs(ctx, cfg.batches, _NAME, next(model.parameters()).device)
    allocation = owl_allocation(model, layers, inputs, cfg) if cfg.owl > 0 else {}

    def prune(step: BlockStep) -> None:
        sparsity = allocation.get(step.fqn, cfg.sparsity)
        for fqn, module in step.layers.items():
            if fqn not in step.stats:
                logger.warning("%s: skipping %s, calibration never called it with an input", _NAME, fqn)
                continue
            scores = wanda_scores(weight_of(module), step.stats[fqn].squares)
            keep = nm_mask(scores, *nm) if nm is not None else row_mask(scores, sparsity)
            surgery.add_mask(module, "weight", keep)

    def new_stat(fqn: str, module: nn.Module) -> InputNorms:
        return InputNorms(int(weight_of(module).shape[1]), weight_of(module).device)

    outside = layerwise(model, inputs, layers=layers, new_stat=new_stat, on_block=prune)
    warn_outside(outside, cfg, _NAME)
    return finish(model, layers, allocation, {"calibration_batches": float(len(inputs))})
