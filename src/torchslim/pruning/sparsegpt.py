"""SparseGPT: one-shot pruning with Optimal Brain Surgeon weight updates, layer by layer.

Each decoder block is calibrated on the outputs of the already pruned blocks before it
(``torchslim.core.layerwise``); the math for one layer is in ``torchslim.pruning._obs``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar

import torch
from torch import nn

from torchslim.core import Context, MethodConfig, Outcome, calibration_inputs, check, register, surgery
from torchslim.core.layerwise import BlockStep, InputGram, layerwise
from torchslim.errors import DataError
from torchslim.pruning._calibrated import (
    DEFAULT_TARGETS,
    check_common,
    finish,
    owl_allocation,
    parse_pattern,
    pruned_layers,
    warn_outside,
)
from torchslim.pruning._obs import sparsegpt_prune
from torchslim.pruning._unstructured import base_weight, weight_of

__all__ = ["SparseGPTPruningConfig", "apply"]

logger = logging.getLogger(__name__)

_NAME = "pruning.sparsegpt"


@dataclasses.dataclass(frozen=True, kw_only=True)
class SparseGPTPruningConfig(MethodConfig):
    """Prune with second-order (OBS) saliency and update the kept weights to compensate.

    Paper: Frantar, Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
    One-Shot", ICML 2023, https://arxiv.org/abs/2301.00774; optional outlier-weighed per-block
    sparsity from Yin et al., "Outlier Weighed Layerwise Sparsity (OWL)", ICML 2024,
    https://arxiv.org/abs/2310.05175

    Args:
        sparsity: Fraction of each layer's weights set to zero, in [0, 1) (unstructured;
            exact within each block of columns).
        pattern: ``unstructured``, or ``N:M`` (``2:4``): keep N of every M consecutive inputs
            of each row; the sparsity is then 1 - N/M and ``sparsity`` is not used.
        block_size: Columns pruned together before the remaining columns are updated; a
            multiple of M for N:M.
        damping: Added to the Hessian ``2 X^T X / n`` diagonal, relative to its mean.
        owl: OWL's lambda: block sparsities average ``sparsity`` and span ``2 * owl``,
            lower where more Wanda scores are outliers; 0 prunes every block to ``sparsity``.
        owl_threshold: A score is an outlier above this multiple of its block's mean score.
        batches: Calibration batches used at most (from ``ctx.calib_data``, else
            ``ctx.train_data``): token-id tensors, ``{"input_ids": ...}`` dicts or
            ``(inputs, targets)`` pairs.
        targets: Layer selectors: an fqn, ``re:<regex>`` or ``type:<ClassName>``.
        ignore: Selectors removed from ``targets``.

    Recipe:
        - method: pruning.sparsegpt
          sparsity: 0.5
          pattern: "2:4"
          block_size: 128
          damping: 0.01

    Notes:
        Blocks are the model's ``nn.ModuleList`` of same-class layers that it runs as a chain
        (a decoder stack); a model without one is calibrated as a single block. Only
        ``nn.Linear`` layers inside the blocks are pruned; the others, tied weights and layers
        never called with an input are skipped with a log line. The kept weights are changed
        in place and the zeros are held by a mask until the stage ends, so a ``train`` block in
        the same stage keeps them. Weights of inputs that are zero on all calibration data are
        set to zero, as in the paper. The KV cache is turned off during calibration. Dense
        kernels run no faster.
    """

    name: ClassVar[str] = _NAME
    sparsity: float = 0.5
    pattern: str = "unstructured"
    block_size: int = 128
    damping: float = 0.01
    owl: float = 0.0
    owl_threshold: float = 5.0
    batches: int = 128
    targets: tuple[str, ...] = DEFAULT_TARGETS
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_common(self, _NAME)
        check(self.block_size >= 1, f"{_NAME}: block_size must be >= 1, got {self.block_size}")
        check(self.damping >= 0, f"{_NAME}: damping must be >= 0, got {self.damping}")
        nm = parse_pattern(self.pattern, _NAME)
        check(nm is None or self.block_size % nm[1] == 0,
              f"{_NAME}: block_size {self.block_size} must be a multiple of M in pattern {self.pattern}")


@register(SparseGPTPruningConfig)
def apply(model: nn.Module, cfg: SparseGPTPruningConfig, ctx: Context) -> Outcome:
    """Prune each selected layer with OBS updates, one decoder block at a time."""
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

    def new_stat(fqn: str, module: nn.Module) -> InputGram:
        return InputGram(int(weight_of(module).shape[1]), weight_of(module).device)

    def prune(step: BlockStep) -> None:
        sparsity = allocation.get(step.fqn, cfg.sparsity)
        for fqn, module in step.layers.items():
            if fqn not in step.stats:
                logger.warning("%s: skipping %s, calibration never called it with an input", _NAME, fqn)
                continue
            _prune_layer(fqn, module, step.stats[fqn], cfg, sparsity, nm)

    outside = layerwise(model, inputs, layers=layers, new_stat=new_stat, on_block=prune)
    warn_outside(outside, cfg, _NAME)
    return finish(model, layers, allocation, {"calibration_batches": float(len(inputs))})


def _prune_layer(fqn: str, module: nn.Module, stat: InputGram, cfg: SparseGPTPruningConfig,
                 sparsity: float, nm: tuple[int, int] | None) -> None:
    """Write the OBS-updated weight into ``module`` and hold its zeros with a mask."""
    hessian = stat.hessian()
    if not torch.isfinite(hessian).all():
        raise DataError(f"{_NAME}: the calibration inputs of {fqn} contain NaN or inf; "
                        "expected finite activations")
    new_weight, keep = sparsegpt_prune(weight_of(module), hessian, sparsity=sparsity, nm=nm,
                                       block_size=cfg.block_size, damping=cfg.damping)
    with torch.no_grad():
        base_weight(module).copy_(new_weight)
    surgery.add_mask(module, "weight", keep)
