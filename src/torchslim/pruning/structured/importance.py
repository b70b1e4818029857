"""Channel importance scorers, registered by name: l1, l2, bn_scale, taylor, entropy, apoz.

A scorer returns, for every group, one score per channel (higher means keep). Weight-based
scores add up every layer of the group, each layer's share divided by its mean so that no layer
dominates by scale (Torch-Pruning's group normalization). Calibration-based scores
(``entropy``, ``apoz``) read activations of the group's norm layers (else its producing
layers) through a ``HookSet``; ``taylor`` backpropagates a few calibration batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchslim.core import Context, HookSet, first_batch_inputs
from torchslim.errors import ConfigError
from torchslim.pruning.structured.graph import ChannelGraph, split_inputs
from torchslim.pruning.structured.group import Group, Slice

__all__ = ["Scoring", "channel_entropy", "importance_names", "register_importance", "score"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Scoring:
    """What scorers may use besides the model and its groups."""

    graph: ChannelGraph
    ctx: Context | None = None
    batches: int = 8


Scorer = Callable[[nn.Module, Sequence[Group], Scoring], list[torch.Tensor]]
_SCORERS: dict[str, Scorer] = {}


def register_importance(name: str) -> Callable[[Scorer], Scorer]:
    """Make a scorer available to ``pruning.channel`` as ``importance: <name>``."""

    def bind(fn: Scorer) -> Scorer:
        if name in _SCORERS:
            raise RuntimeError(f"importance {name!r} is registered twice")
        _SCORERS[name] = fn
        return fn

    return bind


def importance_names() -> list[str]:
    """Every registered importance name, sorted."""
    return sorted(_SCORERS)


def score(name: str, model: nn.Module, groups: Sequence[Group], scoring: Scoring) -> list[torch.Tensor]:
    """Scores of every channel of every group under importance ``name``."""
    if name not in _SCORERS:
        raise ConfigError(f"unknown importance {name!r}; known: {', '.join(importance_names())}")
    scores = _SCORERS[name](model, groups, scoring)
    return [torch.nan_to_num(s.float(), nan=0.0) for s in scores]


def _tensor(model: nn.Module, s: Slice) -> torch.Tensor:
    t: torch.Tensor = getattr(model.get_submodule(s.fqn), s.name)
    return t


def _accumulate(total: torch.Tensor, s: Slice, per_position: torch.Tensor) -> None:
    """Add one slice's per-position values to its channels, scaled to mean 1."""
    chans = torch.tensor(s.channels)
    hit = chans >= 0
    values = torch.zeros_like(total).index_add_(0, chans[hit], per_position[hit].float().cpu())
    mean = values[values > 0].mean() if bool((values > 0).any()) else None
    if mean is not None:
        total += values / mean


def _weight_slices(group: Group) -> list[Slice]:
    return [s for s in group.slices if s.is_parameter and not s.name.endswith("bias")]


def _rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t.detach().float().movedim(dim, 0).reshape(t.shape[dim], -1)  # (positions, rest)


def _magnitude(model: nn.Module, groups: Sequence[Group], power: int) -> list[torch.Tensor]:
    out = []
    for g in groups:
        total = torch.zeros(g.size)
        for s in _weight_slices(g):
            _accumulate(total, s, _rows(_tensor(model, s), s.dim).abs().pow(power).sum(1))
        out.append(total)
    return out


@register_importance("l1")
def l1(model: nn.Module, groups: Sequence[Group], scoring: Scoring) -> list[torch.Tensor]:
    """Sum of absolute weights of each channel over every coupled layer."""
    return _magnitude(model, groups, 1)


@register_importance("l2")
def l2(model: nn.Module, groups: Sequence[Group], scoring: Scoring) -> list[torch.Tensor]:
    """Sum of squared weights of each channel over every coupled layer."""
    return _magnitude(model, groups, 2)


@register_importance("bn_scale")
def bn_scale(model: nn.Module, groups: Sequence[Group], scoring: Scoring) -> list[torch.Tensor]:
    """|gamma| of the group's BatchNorm layers (Network Slimming); l2 where a group has none."""
    out = []
    for g in groups:
        total = torch.zeros(g.size)
        norms = [s for s in g.slices if s.name == "weight" and isinstance(
            model.get_submodule(s.fqn), nn.modules.batchnorm._BatchNorm)]
        for s in norms:
            _accumulate(total, s, _tensor(model, s).detach().abs())
        if not norms:
            logger.debug("bn_scale: group %s has no BatchNorm; using l2", g.name)
            total = _magnitude(model, [g], 2)[0]
        out.append(total)
    return out


def _calibration(model: nn.Module, scoring: Scoring, who: str) -> Iterator[tuple[Any, Any]]:
    """(inputs, targets or None) for up to ``scoring.batches`` calibration batches."""
    ctx = scoring.ctx if scoring.ctx is not None else Context()
    for i, batch in enumerate(ctx.calibration_batches(who)):
        if i >= scoring.batches:
            break
        inputs = first_batch_inputs(batch)
        has_target = isinstance(batch, (list, tuple)) and len(batch) == 2
        yield inputs, (batch[1] if has_target else None)


@contextlib.contextmanager
def _as_is(model: nn.Module) -> Iterator[None]:
    """Eval mode for the body; train flags and requires_grad restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training
        for p, requires_grad, grad in grads:
            p.requires_grad_(requires_grad)
            p.grad = grad


def _task_loss(out: Any, target: Any, ctx: Context | None) -> torch.Tensor:
    logits: torch.Tensor = out[0] if isinstance(out, (tuple, list)) else out
    if target is None:
        return logits.float().pow(2).mean()  # no labels: keep the output's energy
    if ctx is not None and ctx.loss_fn is not None:
        loss: torch.Tensor = ctx.loss_fn(out, target)
        return loss
    return F.cross_entropy(logits.flatten(0, -2).float(), target.flatten())


@register_importance("taylor")
def taylor(model: nn.Module, groups: Sequence[Group], scoring: Scoring) -> list[torch.Tensor]:
    """First-order Taylor estimate |w * dL/dw| of each channel, over calibration batches."""
    with _as_is(model):
        for p in model.parameters():
            p.requires_grad_(True)
            p.grad = None
        for inputs, target in _calibration(model, scoring, "pruning.channel (importance=taylor)"):
            args, kwargs = split_inputs(inputs)
            with torch.enable_grad():
                _task_loss(model(*args, **kwargs), target, scoring.ctx).backward()  # type: ignore[no-untyped-call]
        out = []
        for g in groups:
            total = torch.zeros(g.size)
            for s in _weight_slices(g):
                t = _tensor(model, s)
                if t.grad is not None:
                    _accumulate(total, s, _rows(t * t.grad, s.dim).abs().sum(1))
            out.append(total)
    return out


def _sites(graph: ChannelGraph, model: nn.Module, group: Group) -> list[tuple[str, int, Slice]]:
    """(module fqn, output dim, slice) of layers whose outputs carry the group's channels."""
    el, found = graph.elements, []
    for role in ("norm", "out"):
        for s in group.slices:
            labels = graph.module_out.get(s.fqn)
            if s.role != role or s.name not in ("weight", "running_mean") or not labels:
                continue
            own = el.roots(_slot_elements(graph, s))
            for d, vec in labels.items():
                if len(vec) == len(own) and (el.roots(vec) == own).all():
                    found.append((s.fqn, d, s))
                    break
        if found:
            return found
    return found


def _slot_elements(graph: ChannelGraph, s: Slice) -> Any:
    """The element ids of the tensor dim a slice refers to."""
    for slot in graph.slots:
        if slot.dim == s.dim and (s.fqn, s.name) in slot.owners:
            return slot.elements
    raise KeyError(f"{s.fqn}.{s.name} dim {s.dim} was not traced")


def _activation_scores(model: nn.Module, groups: Sequence[Group], scoring: Scoring, who: str,
                       per_batch: Callable[[torch.Tensor], torch.Tensor],
                       reduce: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    """``reduce`` of the stacked ``per_batch(activations, channels last)`` of every site."""
    sites = [_sites(scoring.graph, model, g) for g in groups]
    seen: dict[tuple[str, int], list[torch.Tensor]] = {}

    def hook(key: tuple[str, int]) -> Callable[..., None]:
        def grab(module: nn.Module, args: Any, out: Any) -> None:
            t = out[0] if isinstance(out, (tuple, list)) else out
            seen.setdefault(key, []).append(per_batch(t.detach().float().movedim(key[1], -1)))
        return grab

    with _as_is(model), HookSet() as hooks, torch.no_grad():
        for key in {(fqn, d) for found in sites for fqn, d, _ in found}:
            hooks.forward(model.get_submodule(key[0]), hook(key))
        for inputs, _ in _calibration(model, scoring, who):
            args, kwargs = split_inputs(inputs)
            model(*args, **kwargs)
    out = []
    for g, found in zip(groups, sites):
        total = torch.zeros(g.size)
        for fqn, d, s in found:
            if seen.get((fqn, d)):
                _accumulate(total, s, reduce(torch.cat(seen[(fqn, d)])))
        out.append(total)
    return out


def _per_sample(t: torch.Tensor) -> torch.Tensor:
    """(N, ..., C) -> (N, C): each sample's mean activation per channel."""
    return t.reshape(t.shape[0], -1, t.shape[-1]).mean(1) if t.dim() > 1 else t[None]


@register_importance("apoz")
def apoz(model: nn.Module, groups: Sequence[Group], scoring: Scoring) -> list[torch.Tensor]:
    """1 - average percentage of zeros after ReLU (Hu et al. 2016); needs calibration data."""
    return _activation_scores(model, groups, scoring, "pruning.channel (importance=apoz)",
                              lambda t: _per_sample((t > 0).float()), lambda x: x.mean(0))


@register_importance("entropy")
def entropy(model: nn.Module, groups: Sequence[Group], scoring: Scoring) -> list[torch.Tensor]:
    """Entropy of each channel's pooled activation over samples (Luo & Wu 2017)."""
    return _activation_scores(model, groups, scoring, "pruning.channel (importance=entropy)",
                              _per_sample, channel_entropy)


def channel_entropy(pooled: torch.Tensor, bins: int = 16) -> torch.Tensor:
    """Entropy (nats) of each column of ``pooled`` (N, C), histogrammed into ``bins``."""
    low, high = pooled.min(0).values, pooled.max(0).values
    scaled = (pooled - low) / (high - low).clamp_min(1e-12)
    idx = (scaled * (bins - 1)).round().long()  # (N, C): bin of each sample
    counts = torch.zeros(bins, pooled.shape[1]).scatter_add_(0, idx, torch.ones_like(pooled))
    prob = counts / pooled.shape[0]
    return -(prob * prob.clamp_min(1e-12).log()).sum(0)
