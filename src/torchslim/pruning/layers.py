"""Remove whole layers: transformer blocks or residual blocks, least important first."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar, Literal

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
    structure,
)
from torchslim.core.layerwise import find_blocks, run_batches
from torchslim.errors import ConfigError, DataError, UnsupportedModuleError

__all__ = ["LayerPruningConfig", "apply", "block_influence", "removable_blocks"]

logger = logging.getLogger(__name__)
_NAME = "pruning.layers"
_RESIDUAL = ("BasicBlock", "Bottleneck", "ResidualBlock")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerPruningConfig(MethodConfig):
    """Drop the blocks that change their input least (decoder/encoder layers, residual blocks).

    Paper: Men et al., "ShortGPT: Layers in Large Language Models are More Redundant Than You
    Expect", 2024, https://arxiv.org/abs/2403.03853 (Block Influence)

    Args:
        ratio: Fraction of the candidate blocks removed, in [0, 1).
        importance: ``block_influence``: ``1 - cos(input, output)`` of each block's hidden
            states over the calibration data, averaged over tokens / pixels; the blocks that
            change their input least go first.
        calib_batches: Calibration batches read from ``ctx.calib_data``.

    Recipe:
        - method: pruning.layers
          ratio: 0.25
          calib_batches: 16

    Notes:
        Candidates: the model's stack of same-class blocks (a ``ModuleList`` such as the
        decoder layers of Hugging Face Llama or the encoder layers of BERT), else residual
        blocks with an identity shortcut inside ``nn.Sequential`` stages (torchvision
        ``BasicBlock`` / ``Bottleneck`` without downsampling, MobileNetV2 inverted residuals
        with a skip, torchslim's ``ResidualBlock``). Blocks are physically removed, so the
        model is smaller and faster everywhere; ``layer_idx`` and ``config.num_hidden_layers``
        follow, and ``structure.json`` records which blocks remain. A model without
        candidates is an error. Run it before other structural methods of the same recipe
        (module names after the removed blocks shift). Recover with a ``distillation.*``
        stage from the original.
    """

    name: ClassVar[str] = _NAME
    ratio: float = 0.25
    importance: Literal["block_influence"] = "block_influence"
    calib_batches: int = 16

    def __post_init__(self) -> None:
        check(0 <= self.ratio < 1, f"{_NAME}: ratio must be in [0, 1); found {self.ratio!r}")
        check(self.importance == "block_influence",
              f"{_NAME}: importance must be block_influence; found {self.importance!r}")
        check(self.calib_batches >= 1, f"{_NAME}: calib_batches must be >= 1; found {self.calib_batches!r}")


def _is_residual(module: nn.Module) -> bool:
    if getattr(module, "use_res_connect", False):  # torchvision InvertedResidual with a skip
        return True
    return type(module).__name__ in _RESIDUAL and getattr(module, "downsample", None) is None


def removable_blocks(model: nn.Module) -> dict[str, list[int]]:
    """Container fqn -> indices of its children that may be removed."""
    stack = find_blocks(model)
    if stack is not None and len(stack[1]) > 1:
        return {stack[0]: list(range(len(stack[1])))}
    found: dict[str, list[int]] = {}
    for fqn, module in model.named_modules():
        if fqn and type(module) is nn.Sequential:  # not the root, not a subclass with its own forward
            residual = [i for i, child in enumerate(module) if _is_residual(child)]
            if residual:
                found[fqn] = residual
    return found


def _tokens(t: torch.Tensor) -> torch.Tensor:
    """Feature vectors as rows: channels of (B, C, H, W) maps, the last dimension otherwise."""
    return t.movedim(1, -1).reshape(-1, t.shape[1]) if t.dim() == 4 else t.reshape(-1, t.shape[-1])


@torch.no_grad()
def block_influence(model: nn.Module, blocks: dict[str, nn.Module], batches: list[Any]) -> dict[str, float]:
    """``1 - mean cos(input, output)`` of each block over ``batches``."""
    sums = dict.fromkeys(blocks, 0.0)
    counts = dict.fromkeys(blocks, 0)

    def hook(fqn: str) -> Any:
        def record(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            out = output[0] if isinstance(output, (tuple, list)) else output
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor) and x.shape == out.shape:
                cos = nn.functional.cosine_similarity(_tokens(x).float(), _tokens(out).float(), dim=-1)
                sums[fqn] += float((1 - cos).sum())
                counts[fqn] += cos.numel()
        return record

    with HookSet() as hooks:
        for fqn, block in blocks.items():
            hooks.forward(block, hook(fqn))
        run_batches(model, batches)
    return {f: sums[f] / counts[f] for f in blocks if counts[f]}


@register(LayerPruningConfig)
def apply(model: nn.Module, cfg: LayerPruningConfig, ctx: Context) -> Outcome:
    """Score the candidate blocks on calibration data and remove the least influential."""
    candidates = removable_blocks(model)
    if not candidates:
        raise UnsupportedModuleError(f"{_NAME}: found no removable blocks (expected a ModuleList of "
                                     "same-class layers, or residual blocks with identity shortcuts "
                                     "in nn.Sequential)")
    blocks = {f"{c}.{i}": model.get_submodule(f"{c}.{i}") for c, idx in candidates.items() for i in idx}
    scores = block_influence(model, blocks, calibration_inputs(ctx, cfg.calib_batches, _NAME))
    if not scores:
        raise DataError(f"{_NAME}: the calibration batches reached none of the {len(blocks)} "
                        "candidate blocks")
    order = sorted(scores, key=scores.get)  # type: ignore[arg-type]
    removed = set(order[: round(cfg.ratio * len(blocks))])
    changes: dict[str, dict[str, Any]] = {}
    for container in candidates:
        size = len(list(model.get_submodule(container).children()))
        keep = [i for i in range(size) if f"{container}.{i}" not in removed]
        if not keep:
            raise ConfigError(f"{_NAME}: ratio {cfg.ratio} would remove every block of {container!r}; "
                              "lower the ratio")
        if len(keep) < size:
            changes[container] = {"keep": keep}
    for container, change in sorted(changes.items(), key=lambda kv: -kv[0].count(".")):
        structure.keep_children(model, container, change["keep"], _NAME)
    logger.info("%s: removed %s", _NAME, ", ".join(sorted(removed)) or "nothing")
    return Outcome(model=model, touched=tuple(sorted(removed)), structure=changes,
                   stats={"removed": len(removed), "candidates": len(blocks)},
                   layers={f: {"influence": round(v, 5), "removed": float(f in removed)}
                           for f, v in scores.items()})
