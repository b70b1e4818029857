"""N:M semi-structured sparsity: in every group of M consecutive input weights keep N.

The 2:4 pattern is the one NVIDIA sparse tensor cores (cuSPARSELt, TensorRT) execute at up
to twice the dense speed; 4:8 and others trade accuracy for the same 50% density.
Scores are ``|w|`` or, with calibration data, the Wanda score ``|w| * ||x||``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from torchslim.core import (
    Context,
    HookSet,
    MethodConfig,
    Outcome,
    check,
    first_batch_inputs,
    register,
    surgery,
)
from torchslim.errors import ConfigError, DataError, UnsupportedModuleError
from torchslim.pruning._unstructured import (
    layer_sparsity,
    prunable_layers,
    take_batches,
    to_device,
    weight_of,
)

__all__ = ["NMPruningConfig", "apply", "input_norms", "nm_mask", "parse_pattern"]

logger = logging.getLogger(__name__)

_NAME = "pruning.nm"


def parse_pattern(pattern: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``; ConfigError unless ``0 < N < M``."""
    parts = pattern.split(":")
    try:
        n, m = (int(p) for p in parts) if len(parts) == 2 else (0, 0)
    except ValueError:
        n, m = 0, 0
    if not 0 < n < m:
        raise ConfigError(f"{_NAME}: pattern must be 'N:M' with integers 0 < N < M (e.g. '2:4'), "
                          f"got {pattern!r}")
    return n, m


@dataclasses.dataclass(frozen=True, kw_only=True)
class NMPruningConfig(MethodConfig):
    """Keep the N most important of every M consecutive input weights (N:M sparsity).

    Paper: Mishra et al., "Accelerating Sparse Deep Neural Networks" (NVIDIA 2:4), 2021,
    https://arxiv.org/abs/2104.08378; saliency as in Sun et al., "A Simple and Effective
    Pruning Approach for Large Language Models" (Wanda), 2023, https://arxiv.org/abs/2306.11695

    Args:
        pattern: ``"N:M"`` with 0 < N < M; ``2:4`` is what sparse tensor cores run.
        importance: ``magnitude`` ranks by ``|w|``; ``saliency`` by ``|w| * ||x||``, the L2
            norm of each input feature over the calibration batches (needs
            ``ctx.calib_data``, else ``ctx.train_data``).
        batches: Calibration batches used by ``saliency``.
        targets: Layer selectors: an fqn, ``re:<regex>`` or ``type:<ClassName>``.
        ignore: Selectors removed from ``targets``.

    Recipe:
        - method: pruning.nm
          pattern: "2:4"
          importance: magnitude
          ignore: ["re:.*classifier.*"]

    Notes:
        Groups run along the input dimension of each output row. A convolution's weight
        ``(out, in, kh, kw)`` is grouped over input channels at each ``(out, kh, kw)``:
        the reduction axis of the implicit GEMM in the ``(out, kh, kw, in)`` (KRSC) layout that
        cuSPARSELt and TensorRT use (as NVIDIA's ASP does). Layers whose input width
        (``in_features``, or input channels per group) is not divisible by M are skipped
        with a warning (a 3-channel stem, for example); if no selected layer fits, this is an
        UnsupportedModuleError listing them. Tied weights are skipped too. Saliency uses per
        input channel norms for convolutions; layers that calibration never runs through
        their ``forward`` (``nn.MultiheadAttention.out_proj``) fall back to ``|w|``.
        On CPU the pruned model runs no faster: PyTorch and ONNX Runtime run it as a dense
        model with zeros. Storage shrinks: the saved file holds a bitmask plus the kept
        values (about 53% of fp32 for 2:4, the size of cuSPARSELt's values-plus-indices).
    """

    name: ClassVar[str] = _NAME
    pattern: str = "2:4"
    importance: Literal["magnitude", "saliency"] = "magnitude"
    batches: int = 8
    targets: tuple[str, ...] = ("type:Linear", "type:Conv2d", "type:Conv1d")
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        parse_pattern(self.pattern)
        check(self.importance in ("magnitude", "saliency"),
              f"{_NAME}: importance must be 'magnitude' or 'saliency', got {self.importance!r}")
        check(self.batches >= 1, f"{_NAME}: batches must be >= 1, got {self.batches}")


@torch.no_grad()
def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask keeping the ``n`` highest scores of every ``m`` consecutive inputs.

    ``scores`` has the weight's shape ``(out, in, *kernel)``; groups run along ``in`` at each
    ``(out, *kernel)`` position. Ties keep the earlier entry.

    Raises:
        ValueError: ``in`` is not divisible by ``m``.
    """
    if scores.shape[1] % m:
        raise ValueError(f"input width {scores.shape[1]} is not divisible by M={m}")
    moved = scores.movedim(1, -1)  # (out, in, *k) -> (out, *k, in): in is the reduction axis
    groups = moved.reshape(-1, m)  # (out * prod(k) * in / m, m)
    order = groups.argsort(dim=1, descending=True, stable=True)
    keep = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device)
    keep.scatter_(1, order[:, :n], True)
    return keep.view(moved.shape).movedim(-1, 1).contiguous()


@register(NMPruningConfig)
def apply(model: nn.Module, cfg: NMPruningConfig, ctx: Context) -> Outcome:
    """Add an N:M mask to every selected layer whose input width M divides."""
    n, m = parse_pattern(cfg.pattern)
    layers = prunable_layers(model, cfg.targets, cfg.ignore, _NAME)
    widths = {fqn: int(weight_of(mod).shape[1]) for fqn, mod in layers.items()}
    fitting = {fqn: mod for fqn, mod in layers.items() if widths[fqn] % m == 0}
    skipped = {fqn: w for fqn, w in widths.items() if fqn not in fitting}
    for fqn, width in skipped.items():
        logger.warning("%s: skipping %s, its input width %d is not divisible by M=%d", _NAME, fqn, width, m)
    if not fitting:
        found = ", ".join(f"{f} ({w})" for f, w in skipped.items()) or "none with a 2-D+ weight"
        raise UnsupportedModuleError(f"{_NAME}: pattern {cfg.pattern} needs layers whose input width "
                                     f"is divisible by {m}; the selected layers have: {found}")
    norms = input_norms(model, fitting, ctx, cfg.batches) if cfg.importance == "saliency" else {}
    for fqn, module in fitting.items():
        scores = weight_of(module).detach().abs()
        if fqn in norms:
            scores = scores * _per_weight(norms[fqn], module)
        elif cfg.importance == "saliency":
            logger.warning("%s: %s saw no calibration input; ranking it by |w|", _NAME, fqn)
        surgery.add_mask(module, "weight", nm_mask(scores, n, m))
    per_layer, overall = layer_sparsity(model, fitting)
    return Outcome(model=model, touched=tuple(fitting), layers=per_layer,
                   stats={"sparsity": overall, "skipped_layers": float(len(skipped))})


def _per_weight(norms: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """Input-channel norms ``(C,)`` laid out to broadcast against the weight ``(out, C/g, *k)``."""
    weight = weight_of(module)
    groups = int(getattr(module, "groups", 1))
    out = int(weight.shape[0])
    per_group = norms.to(weight.device).view(groups, -1)  # (g, C/g)
    rows = per_group.repeat_interleave(out // groups, dim=0)  # (out, C/g)
    return rows.view(out, -1, *([1] * (weight.dim() - 2)))


@torch.no_grad()
def input_norms(model: nn.Module, layers: dict[str, nn.Module], ctx: Context,
                batches: int) -> dict[str, torch.Tensor]:
    """L2 norm of each input feature (Linear) or channel (conv) over the calibration batches.

    Runs the model in eval mode on up to ``batches`` batches and restores its mode; layers
    that never run their own ``forward`` are absent from the result.
    """
    data = take_batches(ctx.calibration_batches(_NAME), batches)
    if not data:
        raise DataError(f"{_NAME}: importance 'saliency' needs calibration batches; the data is empty")
    sums: dict[str, torch.Tensor] = {}

    def hook_for(fqn: str, channel_dim: int) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            x = args[0].detach().float()
            dims = [d for d in range(x.dim()) if d != channel_dim % x.dim()]
            squares = x.pow(2).sum(dim=dims)  # (C,)
            sums[fqn] = sums[fqn] + squares if fqn in sums else squares
        return hook

    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        with HookSet() as hooks:
            for fqn, module in layers.items():
                hooks.forward(module, hook_for(fqn, -1 if isinstance(module, nn.Linear) else 1))
            for batch in data:
                model(to_device(first_batch_inputs(batch), device))
    finally:
        model.train(was_training)
    return {fqn: s.sqrt() for fqn, s in sums.items()}
