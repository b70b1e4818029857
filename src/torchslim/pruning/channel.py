"""Structured channel pruning over a traced dependency graph, with physical removal."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from torchslim.core import Context, MethodConfig, Outcome, check, register, select
from torchslim.core.select import matches
from torchslim.core.structure import set_config
from torchslim.errors import UnsupportedModuleError
from torchslim.pruning.structured import importance, prune, slicers
from torchslim.pruning.structured.graph import ChannelGraph, split_inputs, trace
from torchslim.pruning.structured.group import Group, build_groups

__all__ = ["ChannelPlan", "ChannelPruningConfig", "apply", "plan"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChannelPruningConfig(MethodConfig):
    """Remove whole channels (filters, hidden units) and shrink every coupled layer.

    Paper: Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017,
    https://arxiv.org/abs/1608.08710; dependency groups as in Fang et al., "DepGraph: Towards
    Any Structural Pruning", CVPR 2023, https://arxiv.org/abs/2301.12900

    Args:
        ratio: Fraction of the channels of each group removed, in [0, 1).
        importance: How channels are ranked: ``l1``, ``l2`` (weight norms summed over every
            coupled layer), ``bn_scale`` (|BatchNorm gamma|), ``taylor`` (|w * grad| on
            calibration batches), ``entropy`` (entropy of each channel's activations) or
            ``apoz`` (share of positive activations). The last three need ``ctx.calib_data``.
        targets: Layers whose output channels may be removed: an fqn, ``re:<regex>`` or
            ``type:<ClassName>``.
        ignore: Layers kept exactly as they are: neither their inputs nor their outputs lose
            channels, and the tracer does not look inside them.
        round_to: Keep a multiple of this many channels in each group (e.g. 8 for fast kernels).
        min_channels: Never keep fewer channels than this in a group.
        calib_batches: Calibration batches read by ``taylor``, ``entropy`` and ``apoz``.
        outputs: ``keep``: the model's outputs keep their size. ``prune``: their channels
            may go too, e.g. a Transformer's hidden size: with ``targets`` naming every
            layer that writes to the residual stream (the embedding tables and each residual
            branch's output projection), the stream, its norms, every layer reading it and
            the sentence embedding or last hidden state become narrower. When a Hugging
            Face model's input embedding narrows, its ``config.hidden_size`` follows, and
            ``ts.load`` sets it again from structure.json.

    Recipe:
        - method: pruning.channel
          ratio: 0.5
          importance: l2
          ignore: ["re:.*attn.*"]
        - method: pruning.channel     # a BERT encoder's hidden size, 384 -> 288
          ratio: 0.25
          targets: [type:Embedding, 're:.*\\.output\\.dense$']
          outputs: prune

    Notes:
        The model is traced once on ``ctx.example_inputs``. Channels joined by a residual add,
        a concatenation, a depthwise or grouped convolution, a norm layer or a tied weight are
        removed together; a grouped convolution loses whole groups. Channels feeding an
        operation the tracer cannot follow, the model's outputs (unless ``outputs: prune``),
        and ``nn.MultiheadAttention`` (see ``pruning.heads``) keep their size. A group is cut
        only when every layer producing its channels, and every layer sharing their tensors
        (a tied ``lm_head``), is in ``targets``. The cut model is run once and compared with
        the trace. On a mismatch (often a width read with ``x.shape`` and reused in a reshape)
        the cut is undone and the model traced again keeping every dim whose size the code
        reads; if that also fails, the model is restored and an error names the operation.
    """

    name: ClassVar[str] = "pruning.channel"
    ratio: float = 0.5
    importance: str = "l2"
    targets: tuple[str, ...] = ("type:Conv1d", "type:Conv2d", "type:Conv3d", "type:ConvTranspose1d",
                                "type:ConvTranspose2d", "type:Linear", "type:Embedding")
    ignore: tuple[str, ...] = ()
    round_to: int = 1
    min_channels: int = 1
    calib_batches: int = 8
    outputs: Literal["keep", "prune"] = "keep"

    def __post_init__(self) -> None:
        check(0.0 <= self.ratio < 1.0, f"ratio must be in [0, 1), got {self.ratio}")
        known = importance.importance_names()
        check(self.importance in known,
              f"importance must be one of {', '.join(known)}; got {self.importance!r}")
        check(self.round_to >= 1, f"round_to must be >= 1, got {self.round_to}")
        check(self.min_channels >= 0, f"min_channels must be >= 0, got {self.min_channels}")
        check(self.calib_batches >= 1, f"calib_batches must be >= 1, got {self.calib_batches}")


@dataclasses.dataclass(frozen=True)
class ChannelPlan:
    """What ``plan`` decided: the trace, the prunable groups and the channels to remove."""

    graph: ChannelGraph
    groups: tuple[Group, ...]
    removed: tuple[tuple[int, ...], ...]


def plan(model: nn.Module, cfg: ChannelPruningConfig, ctx: Context, *,
         strict_sizes: bool = False) -> ChannelPlan:
    """Trace ``model``, score its channels and choose which to remove; the model is not changed."""
    inputs = ctx.require_example_inputs("pruning.channel")
    selected = {fqn for fqn, _ in select(model, cfg.targets, cfg.ignore)}
    ignored = {fqn for fqn, m in model.named_modules() if fqn and any(matches(s, fqn, m) for s in cfg.ignore)}
    graph = trace(model, inputs, ignore=ignored, strict_sizes=strict_sizes,
                  fixed_outputs=cfg.outputs == "keep")
    if graph.blocked:
        logger.info("pruning.channel: channels reaching these operations are kept: %s",
                    ", ".join(f"{k} x{n}" for k, n in graph.blocked.most_common(8)))
    groups = tuple(g for g in build_groups(graph, model, selected) if g.prunable)
    if not groups or cfg.ratio == 0:
        return ChannelPlan(graph, groups, tuple(() for _ in groups))
    scores = importance.score(cfg.importance, model, groups,
                              importance.Scoring(graph, ctx, cfg.calib_batches))
    removed = prune.choose(groups, scores, ratio=cfg.ratio, round_to=cfg.round_to,
                           min_channels=cfg.min_channels)
    return ChannelPlan(graph, groups, tuple(tuple(r) for r in removed))


def _cut(model: nn.Module, chosen: ChannelPlan, inputs: Any) -> tuple[prune.Cut | None, str | None]:
    """Cut as planned and run the result once; on a mismatch, undo and describe it."""
    cut = prune.cut_channels(model, chosen.groups, chosen.removed)
    problem = prune.verify(model, chosen.graph, chosen.groups, chosen.removed, inputs)
    if problem is None:
        return cut, None
    cut.undo()
    return None, problem


@register(ChannelPruningConfig)
def apply(model: nn.Module, cfg: ChannelPruningConfig, ctx: Context) -> Outcome:
    """Trace, score, choose and physically remove channels; verify the cut model."""
    chosen = plan(model, cfg, ctx)
    inputs = ctx.example_inputs
    flops_before, params_before = _flops(model, inputs), _params(model)
    widths = _widths(model, [fqn for g in chosen.groups for fqn in g.producers])
    embedding_width = _embedding_width(model)
    cut, problem = _cut(model, chosen, inputs) if any(chosen.removed) else (None, None)
    if problem is not None:  # a size read in the code ended up in a shape: keep such dims
        logger.info("pruning.channel: %s; tracing again, keeping every dim whose size is read", problem)
        chosen = plan(model, cfg, ctx, strict_sizes=True)
        cut, retry = _cut(model, chosen, inputs) if any(chosen.removed) else (None, None)
        if retry is not None:
            raise prune.unfollowable(problem)
    if cut is None:
        logger.log(logging.INFO if cfg.ratio == 0 else logging.WARNING,
                   "pruning.channel: nothing to prune (%d prunable groups)", len(chosen.groups))
        return Outcome(model=model, stats={"ratio": cfg.ratio, "groups": float(len(chosen.groups))})
    stats = {
        "ratio": cfg.ratio, "groups": float(len(chosen.groups)),
        "channels_removed": float(sum(map(len, chosen.removed))),
        "params_removed": float(params_before - _params(model)),
        "flops_ratio": _flops(model, inputs) / flops_before if flops_before else 1.0,
    }
    after = _widths(model, list(widths))
    new_width = _embedding_width(model)
    if embedding_width is not None and new_width is not None and new_width != embedding_width:
        sizes = _sync_hidden_size(model, embedding_width, new_width)
        if sizes:
            cut.structure[""] = {**cut.structure.get("", {"keep_module": True}), "config": sizes}
    layers = {fqn: {"kept": float(after[fqn]), "ratio": 1.0 - after[fqn] / n}
              for fqn, n in widths.items() if after[fqn] != n}
    return Outcome(model=model, touched=tuple(cut.touched), structure=cut.structure, stats=stats,
                   layers=layers)


def _embedding_width(model: nn.Module) -> int | None:
    """Width of the input embedding table of the outermost Hugging Face model inside ``model``."""
    for module in model.modules():
        get = getattr(module, "get_input_embeddings", None)
        if callable(get):
            try:
                table = get()
            except NotImplementedError:
                continue
            return table.embedding_dim if isinstance(table, nn.Embedding) else None
    return None


def _sync_hidden_size(model: nn.Module, old: int, new: int) -> dict[str, int]:
    """Set ``config.hidden_size`` to the embedding's new width when the model's config held the old one.

    ``set_config`` does the setting, as ``ts.load`` replays it from structure.json.
    """
    configs = (getattr(m, "config", None) for m in model.modules())
    holder = next((c for c in configs if type(getattr(c, "hidden_size", None)) is int), None)
    if holder is None or holder.hidden_size != old:
        return {}
    set_config(model, {"hidden_size": new}, "pruning.channel")
    return {"hidden_size": new}


def _widths(model: nn.Module, fqns: Sequence[str]) -> dict[str, int]:
    """Output channels of each layer that has a slicer."""
    out = {}
    for fqn in fqns:
        try:
            out[fqn] = slicers.size(model.get_submodule(fqn), 0)
        except UnsupportedModuleError:
            continue
    return out


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class _MacCounter(TorchFunctionMode):
    """Multiply-adds of convolutions, linear layers and matmuls (enough for a before/after ratio)."""

    def __init__(self) -> None:
        super().__init__()
        self.macs = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if isinstance(out, torch.Tensor) and len(args) > 1 and isinstance(args[1], torch.Tensor):
            if name in ("conv1d", "conv2d", "conv3d", "linear"):
                self.macs += out.numel() * (args[1][0].numel() if name != "linear" else args[1].shape[-1])
            elif name in ("matmul", "bmm", "mm", "__matmul__"):
                self.macs += out.numel() * args[0].shape[-1]
        return out


def _flops(model: nn.Module, inputs: Any) -> int:
    args, kwargs = split_inputs(inputs)
    flags = [(m, m.training) for m in model.modules()]
    counter = _MacCounter()
    try:
        with torch.no_grad(), counter:
            model.eval()
            model(*args, **kwargs)
    finally:
        for m, training in flags:
            m.training = training
    return 2 * counter.macs
