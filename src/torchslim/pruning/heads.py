"""Structured removal of whole attention heads, physically: every attention layer gets narrower."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from torchslim.core import Context, HookSet, MethodConfig, Outcome, check, register, select, take_batches
from torchslim.core.select import matches
from torchslim.errors import DataError, UnsupportedModuleError
from torchslim.pruning._attention import HeadSite, PrunedMultiheadAttention, cut_heads, find_sites
from torchslim.pruning.structured.graph import split_inputs
from torchslim.pruning.structured.importance import _as_is

__all__ = ["HeadPruningConfig", "apply", "choose", "head_scores", "plan"]

logger = logging.getLogger(__name__)
_NAME = "pruning.heads"


@dataclasses.dataclass(frozen=True, kw_only=True)
class HeadPruningConfig(MethodConfig):
    """Remove whole attention heads, least important first; each attention layer gets narrower.

    Paper: Michel et al., "Are Sixteen Heads Really Better than One?", NeurIPS 2019,
    https://arxiv.org/abs/1905.10650 (head importance from the gradient of a head mask)

    Args:
        ratio: Fraction of the heads removed, in [0, 1).
        importance: How heads are ranked: ``l1`` (sum of |w| over the head's rows of the query,
            key and value projections and its columns of the output projection), ``taylor``
            (``|sum of w * dL/dw|`` over the head's output-projection columns, per calibration
            batch, averaged: the first-order change of the loss when the head is masked) or
            ``output`` (mean L2 norm of the head's contribution to the attention output on
            calibration data). ``taylor`` and ``output`` need ``ctx.calib_data`` (or
            ``ctx.train_data``).
        scope: ``layer`` removes ``ratio`` of the heads of every attention layer; ``global``
            ranks the heads of all layers together (a layer never loses its last head).
        targets: Attention modules that may lose heads (an fqn, ``re:<regex>`` or
            ``type:<ClassName>``; a selector naming a parent selects the attention inside it).
            Empty: every supported attention module.
        ignore: Attention modules (or their parents) kept as they are.
        calib_batches: Calibration batches read by ``taylor`` and ``output``.

    Recipe:
        - method: pruning.heads
          ratio: 0.25
          importance: taylor
          scope: global

    Notes:
        Supported: ``nn.MultiheadAttention`` (replaced by ``PrunedMultiheadAttention``, same call
        and batch layout, since ``nn.MultiheadAttention`` needs ``embed_dim == num_heads *
        head_dim``), BERT-style attention (``self.query/key/value`` + ``output.dense``: Hugging
        Face BERT, RoBERTa, MiniLM ...) and Llama-style ``q_proj/k_proj/v_proj/o_proj``. With
        grouped-query attention the unit removed is a key/value head with the query heads that
        read it. The removed rows and columns are cut out of the projections, and the module's
        head counts follow (``num_attention_heads``/``all_head_size``, or ``num_heads``/
        ``num_key_value_heads`` where the module has them); ``structure.json`` records it, so
        ``ts.load`` rebuilds the narrower model. The result equals the original with those heads'
        output-projection columns set to zero. ``ratio`` counts heads; per layer it is rounded
        to whole units, and a rounding that would take every head of a layer keeps its best one
        (with a warning). ``taylor`` without targets in the batches uses a fixed random
        projection of the model's output as the loss (its gradient estimates how much the head
        moves the output). A model without a supported attention module is an error. Recover
        accuracy with a ``distillation.*`` stage from the original.
    """

    name: ClassVar[str] = _NAME
    ratio: float = 0.25
    importance: Literal["l1", "taylor", "output"] = "l1"
    scope: Literal["layer", "global"] = "layer"
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    calib_batches: int = 8

    def __post_init__(self) -> None:
        check(0 <= self.ratio < 1, f"{_NAME}: ratio must be in [0, 1); found {self.ratio!r}")
        check(self.importance in ("l1", "taylor", "output"),
              f"{_NAME}: importance must be l1, taylor or output; found {self.importance!r}")
        check(self.scope in ("layer", "global"),
              f"{_NAME}: scope must be layer or global; found {self.scope!r}")
        check(self.calib_batches >= 1, f"{_NAME}: calib_batches must be >= 1; found {self.calib_batches!r}")


def _selected(model: nn.Module, site: HeadSite, targets: Sequence[str], ignore: Sequence[str]) -> bool:
    """Whether ``site`` or a parent matches ``targets`` (or targets is empty) and none matches ``ignore``."""
    parts = site.fqn.split(".") if site.fqn else []
    names = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    chain = [(f, model.get_submodule(f)) for f in names]
    hit = not targets or any(matches(s, f, m) for s in targets for f, m in chain)
    return hit and not any(matches(s, f, m) for s in ignore for f, m in chain)


def _sites(model: nn.Module, cfg: HeadPruningConfig) -> list[HeadSite]:
    sites, skipped = find_sites(model)
    if skipped:
        logger.warning("%s: left as they are: %s", _NAME, "; ".join(skipped))
    if not sites:
        kinds = sorted({type(m).__name__ for m in model.modules()})
        raise UnsupportedModuleError(
            f"{_NAME}: expected nn.MultiheadAttention, BERT-style attention (self.query/key/value + "
            f"output.dense) or Llama-style q_proj/k_proj/v_proj/o_proj; found none in a model of "
            f"{', '.join(kinds)}" + (f" (skipped: {'; '.join(skipped)})" if skipped else ""))
    if cfg.targets or cfg.ignore:
        select(model, cfg.targets or ("re:.+",), cfg.ignore)  # an fqn or regex matching nothing is an error
    chosen = [s for s in sites if _selected(model, s, cfg.targets, cfg.ignore)]
    if not chosen:
        raise UnsupportedModuleError(f"{_NAME}: targets {list(cfg.targets)} minus ignore {list(cfg.ignore)} "
                                     f"leave none of the attention modules {[s.fqn for s in sites]}")
    return [s for s in sites if s in chosen]


def _unit_sums(site: HeadSite, model: nn.Module, values: Mapping[tuple[str, str], torch.Tensor],
               output_only: bool) -> torch.Tensor:
    """Per unit, the sum of ``values`` (shaped like each part's tensor) over the unit's slice."""
    total = torch.zeros(site.units, dtype=torch.float64)
    for part in site.parts:
        t = values.get((part.fqn, part.name))
        if t is None or (output_only and not part.output):
            continue
        for u in range(site.units):
            total[u] += t.index_select(part.axis, part.indices([u]).to(t.device)).double().sum().cpu()
    return total


def _l1(model: nn.Module, sites: Sequence[HeadSite]) -> dict[str, torch.Tensor]:
    out = {}
    for site in sites:
        values = {(p.fqn, p.name): getattr(model.get_submodule(p.fqn), p.name).detach().abs()
                  for p in site.parts}
        out[site.fqn] = _unit_sums(site, model, values, output_only=False)
    return out


def _output_tensor(out: Any) -> torch.Tensor:
    """The tensor standing for a model's output: itself, ``.logits``, ``.last_hidden_state`` or the first."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("logits", "last_hidden_state"):
        if isinstance(getattr(out, name, None), torch.Tensor):
            return getattr(out, name)  # type: ignore[no-any-return]
    items = list(out.values()) if isinstance(out, Mapping) else []
    items = list(out) if isinstance(out, (tuple, list)) else items
    for item in items:
        if isinstance(item, (torch.Tensor, tuple, list, Mapping)):
            return _output_tensor(item)
    raise DataError(f"{_NAME}: cannot find a tensor in the model's output of type {type(out).__name__}")


def _loss(out: Any, target: Any, ctx: Context, seed: int) -> torch.Tensor:
    """The task loss with targets; else a fixed random projection of the output."""
    y = _output_tensor(out)
    if target is None:
        g = torch.Generator().manual_seed(seed)
        return (y.float() * torch.randn(y.shape, generator=g).to(y.device)).sum()
    if ctx.loss_fn is not None:
        return ctx.loss_fn(out, target)
    return F.cross_entropy(y.flatten(0, -2).float(), target.flatten())


def _batches(ctx: Context, n: int, who: str) -> list[tuple[Any, Any]]:
    """(inputs, targets or None) of the first ``n`` calibration batches."""
    raw = take_batches(ctx.calibration_batches(who), n)
    if not raw:
        raise DataError(f"{who}: needs at least one calibration batch; ctx.calib_data gave none")
    return [(b[0], b[1]) if isinstance(b, (list, tuple)) and len(b) == 2 else (b, None) for b in raw]


def _taylor(model: nn.Module, sites: Sequence[HeadSite], ctx: Context, n: int) -> dict[str, torch.Tensor]:
    out = {s.fqn: torch.zeros(s.units, dtype=torch.float64) for s in sites}
    params = {(p.fqn, p.name): getattr(model.get_submodule(p.fqn), p.name) for s in sites for p in s.parts
              if p.output}
    batches = _batches(ctx, n, f"{_NAME} (importance=taylor)")
    with _as_is(model):
        for p in model.parameters():
            p.requires_grad_(False)
        for t in params.values():
            t.requires_grad_(True)
        for i, (inputs, target) in enumerate(batches):
            for t in params.values():
                t.grad = None
            args, kwargs = split_inputs(inputs)
            with torch.enable_grad():
                _loss(model(*args, **kwargs), target, ctx, ctx.seed + i).backward()  # type: ignore[no-untyped-call]
            wg = {k: t.detach() * t.grad for k, t in params.items() if t.grad is not None}
            for s in sites:
                out[s.fqn] += _unit_sums(s, model, wg, output_only=True).abs() / len(batches)
    return out


def _output(model: nn.Module, sites: Sequence[HeadSite], ctx: Context, n: int) -> dict[str, torch.Tensor]:
    """Mean L2 norm over tokens of each unit's share of the output projection, on calibration data."""
    out = {s.fqn: torch.zeros(s.units, dtype=torch.float64) for s in sites}
    counts = dict.fromkeys(out, 0)

    def grab(site: HeadSite, weight: torch.Tensor) -> Any:
        part = next(p for p in site.parts if p.output)

        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (tokens, heads * head_dim)
            for u in range(site.units):
                idx = part.indices([u]).to(x.device)
                out[site.fqn][u] += float((x[:, idx] @ weight.float()[:, idx].T).norm(dim=-1).sum())
            counts[site.fqn] += x.shape[0]
        return hook

    swapped: list[tuple[str, nn.Module]] = []
    with _as_is(model), torch.no_grad(), HookSet() as hooks:
        for s in sites:
            if s.kind == "mha":  # its out_proj is not called as a module: run the equivalent copy
                mha = model.get_submodule(s.fqn)
                assert isinstance(mha, nn.MultiheadAttention)
                swapped.append((s.fqn, mha))
                _swap(model, s.fqn, PrunedMultiheadAttention.from_multihead_attention(mha).eval())
            o = model.get_submodule(next(p for p in s.parts if p.output).fqn)
            assert isinstance(o, nn.Linear)
            hooks.forward_pre(o, grab(s, o.weight))
        try:
            for inputs, _ in _batches(ctx, n, f"{_NAME} (importance=output)"):
                args, kwargs = split_inputs(inputs)
                model(*args, **kwargs)
        finally:
            for fqn, mha in swapped:
                _swap(model, fqn, mha)
    return {f: v / max(counts[f], 1) for f, v in out.items()}


def _swap(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def head_scores(model: nn.Module, sites: Sequence[HeadSite], cfg: HeadPruningConfig,
                ctx: Context) -> dict[str, torch.Tensor]:
    """Site fqn -> one score per unit (higher: keep)."""
    if cfg.importance == "taylor":
        return _taylor(model, sites, ctx, cfg.calib_batches)
    if cfg.importance == "output":
        return _output(model, sites, ctx, cfg.calib_batches)
    return _l1(model, sites)


def choose(sites: Sequence[HeadSite], scores: Mapping[str, torch.Tensor], ratio: float,
           scope: str) -> dict[str, list[int]]:
    """Site fqn -> the units to remove (sorted); every site keeps at least one unit."""
    removed: dict[str, list[int]] = {s.fqn: [] for s in sites}
    if scope == "layer":
        for s in sites:
            n = math.floor(ratio * s.units + 0.5)
            if n >= s.units and ratio > 0:
                logger.warning("%s: ratio %s would remove all %d heads of %s; its best unit is kept",
                               _NAME, ratio, s.heads, s.fqn)
                n = s.units - 1
            order = torch.argsort(scores[s.fqn], stable=True)
            removed[s.fqn] = sorted(order[:n].tolist())
        return removed
    target = math.floor(ratio * sum(s.heads for s in sites) + 0.5)
    ranked = sorted((float(scores[s.fqn][u]), i, u) for i, s in enumerate(sites) for u in range(s.units))
    gone = 0
    for _, i, u in ranked:
        s = sites[i]
        if gone + s.group <= target and len(removed[s.fqn]) < s.units - 1:
            removed[s.fqn].append(u)
            gone += s.group
    if gone < target:
        logger.warning("%s: removed %d heads instead of %d: every layer keeps at least one",
                       _NAME, gone, target)
    return {f: sorted(r) for f, r in removed.items()}


def plan(model: nn.Module, cfg: HeadPruningConfig,
         ctx: Context) -> tuple[list[HeadSite], dict[str, list[int]]]:
    """The attention sites and, per site, the units ``apply`` removes; the model is not changed."""
    sites = _sites(model, cfg)
    if cfg.ratio == 0:
        return sites, {s.fqn: [] for s in sites}
    return sites, choose(sites, head_scores(model, sites, cfg, ctx), cfg.ratio, cfg.scope)


@register(HeadPruningConfig)
def apply(model: nn.Module, cfg: HeadPruningConfig, ctx: Context) -> Outcome:
    """Score the heads, choose the least important and cut them out of their layers."""
    sites, removed = plan(model, cfg, ctx)
    params_before = sum(p.numel() for p in model.parameters())
    structure: dict[str, dict[str, Any]] = {}
    layers: dict[str, dict[str, float]] = {}
    for s in sites:
        gone = removed[s.fqn]
        layers[s.fqn] = {"heads": float(s.heads), "kept": float(s.heads - len(gone) * s.group)}
        if gone:
            structure.update(cut_heads(model, s, [u for u in range(s.units) if u not in gone]))
    heads_removed = sum(len(removed[s.fqn]) * s.group for s in sites)
    logger.info("%s: removed %d of %d heads", _NAME, heads_removed, sum(s.heads for s in sites))
    stats = {"ratio": cfg.ratio, "heads": float(sum(s.heads for s in sites)),
             "heads_removed": float(heads_removed),
             "params_removed": float(params_before - sum(p.numel() for p in model.parameters()))}
    return Outcome(model=model, touched=tuple(s.fqn for s in sites if removed[s.fqn]), structure=structure,
                   stats=stats, layers=layers)
