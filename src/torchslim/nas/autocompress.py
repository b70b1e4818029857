"""Automatic compression: search per-layer pruning ratios under a FLOPs budget (AMC-like), on Optuna."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from torch import nn

from torchslim.core import Context, MethodConfig, Outcome, check, register, select
from torchslim.errors import ConfigError, DataError, UnsupportedModuleError
from torchslim.measure.flops import count_flops
from torchslim.nas import _study
from torchslim.nas._registry import apply_by_key, merge_structure

__all__ = ["AutoCompressConfig", "apply", "compress_layers"]

logger = logging.getLogger(__name__)
_NAME = "nas.autocompress"
STRATEGIES = ("random", "tpe", "evolution")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AutoCompressConfig(MethodConfig):
    """Search a pruning ratio per layer that keeps the most accuracy under a FLOPs budget.

    Paper: He et al., "AMC: AutoML for Model Compression and Acceleration on Mobile Devices",
    ECCV 2018, https://arxiv.org/abs/1802.03494 (per-layer ratios found by search beat uniform
    ratios at the same FLOPs); the search here runs on an Optuna study instead of a DDPG agent.

    Args:
        prune_method: The registry key applied to each layer (by key, never imported): a
            structured pruning method with ``ratio``, ``targets`` and ``ignore`` fields.
        ratios: The ratios a layer may get (0 leaves it whole).
        flops_budget: Largest allowed FLOPs of the result, as a share of the original's.
        trials: Candidates evaluated (each: prune a copy, measure FLOPs, call ``ctx.eval_fn``).
        strategy: ``random``, ``tpe`` or ``evolution`` (regularized evolution).
        metric: Key of ``ctx.eval_fn``'s result to maximise; empty: its first key.
        targets: Layers that get their own ratio: an fqn, ``re:<regex>`` or ``type:<ClassName>``.
        ignore: Layers left whole (and passed to the pruning method's ``ignore``).
        importance: The ``importance`` field passed to ``prune_method`` (empty: its default).
        group_by: A regular expression with one capture group: selected layers whose names
            give the same capture share one ratio and are pruned in one call (e.g.
            ``features\\.(\\d+)\\.`` gives each MobileNetV2 block one ratio for its expansion
            and depthwise convs, which produce the same channels: structured pruning cuts a
            channel group only when all its producers are targeted). Empty: one ratio per layer.

    Recipe:
        - method: nas.autocompress
          flops_budget: 0.5
          ratios: [0.0, 0.25, 0.5, 0.75]
          trials: 40
          ignore: ["classifier.3"]

    Notes:
        A candidate over the budget is repaired before it is judged: every ratio below the
        largest moves one step up ``ratios`` until the candidate fits (AMC bounds its agent's
        actions by the budget in the same spirit), so nearly every trial is spent inside the
        budget; the trial records the ratios it was judged with (``choice``). A candidate
        that cannot fit even then scores minus infinity. The uniform ratios of ``ratios`` are
        always among the first candidates, so the result is never worse than the best uniform
        setting on ``eval_fn``. Candidates are judged without fine-tuning, as AMC does; add a ``train``
        block or a ``distillation.logits`` stage after it. Needs ``ctx.eval_fn`` and
        ``ctx.example_inputs``; the per-layer ratios chosen are listed in the report.
    """

    name: ClassVar[str] = _NAME
    prune_method: str = "pruning.channel"
    ratios: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)
    flops_budget: float = 0.5
    trials: int = 40
    strategy: str = "tpe"
    metric: str = ""
    targets: tuple[str, ...] = ("type:Conv2d",)
    ignore: tuple[str, ...] = ()
    importance: str = "l2"
    group_by: str = ""

    def __post_init__(self) -> None:
        check(len(self.ratios) >= 1 and all(0 <= r < 1 for r in self.ratios),
              f"{_NAME}: ratios must be a non-empty list of values in [0, 1); found {list(self.ratios)}")
        check(0 < self.flops_budget <= 1,
              f"{_NAME}: flops_budget must be in (0, 1]; found {self.flops_budget!r}")
        check(self.trials >= 1, f"{_NAME}: trials must be >= 1; found {self.trials!r}")
        check(self.strategy in STRATEGIES, f"{_NAME}: strategy must be one of {list(STRATEGIES)}; "
                                           f"found {self.strategy!r}")
        if self.group_by:
            try:
                groups = re.compile(self.group_by).groups
            except re.error as exc:
                raise ConfigError(f"{_NAME}: group_by {self.group_by!r} is not a regular expression: "
                                  f"{exc}") from exc
            check(groups == 1, f"{_NAME}: group_by must have exactly one capture group; found {groups} in "
                               f"{self.group_by!r}")


def compress_layers(model: nn.Module, ratios: dict[str, float], cfg: AutoCompressConfig, ctx: Context,
                    units: Mapping[str, Sequence[str]] | None = None) -> dict[str, dict[str, Any]]:
    """Apply ``cfg.prune_method`` to each unit at its ratio, in place; the merged structure changes.

    ``units`` maps a ratio's key to its layers (default: each key is one layer's name). Units
    with the same ratio are pruned in one call (the method applies its ratio per channel group).
    """
    structure: dict[str, dict[str, Any]] = {}
    by_ratio: dict[float, list[str]] = {}
    for key, ratio in ratios.items():
        if ratio > 0:
            by_ratio.setdefault(ratio, []).extend(units[key] if units is not None else [key])
    for ratio, layers in sorted(by_ratio.items()):
        present = dict(model.named_modules())
        members = [f for f in layers if f in present]
        if not members:
            continue  # layers already removed with their group by an earlier cut
        raw: dict[str, Any] = {"method": cfg.prune_method, "ratio": ratio, "targets": members,
                               "ignore": list(cfg.ignore)}
        if cfg.importance:
            raw["importance"] = cfg.importance
        merge_structure(structure, apply_by_key(model, raw, ctx, _NAME).structure)
    return structure


def _units(layers: list[str], group_by: str) -> dict[str, list[str]]:
    """Gene name -> layers: one layer each, or the layers sharing ``group_by``'s capture."""
    if not group_by:
        return {f: [f] for f in layers}
    units: dict[str, list[str]] = {}
    for fqn in layers:
        match = re.search(group_by, fqn)
        units.setdefault(match.group(1) if match else fqn, []).append(fqn)
    return units


def _score(metrics: dict[str, float], metric: str) -> float:
    if not metrics:
        raise DataError(f"{_NAME}: ctx.eval_fn returned no metric")
    key = metric or next(iter(metrics))
    if key not in metrics:
        raise ConfigError(f"{_NAME}: metric {key!r} is not among eval_fn's results {sorted(metrics)}")
    return float(metrics[key])


@register(AutoCompressConfig)
def apply(model: nn.Module, cfg: AutoCompressConfig, ctx: Context) -> Outcome:
    """Search per-layer ratios on copies of ``model``, then prune ``model`` with the best."""
    import optuna

    if ctx.eval_fn is None:
        raise DataError(f"{_NAME}: needs ctx.eval_fn to judge candidates")
    x = ctx.require_example_inputs(_NAME)
    found = [f for f, m in select(model, cfg.targets, cfg.ignore) if isinstance(m, nn.Conv2d | nn.Linear)]
    if not found:
        raise UnsupportedModuleError(f"{_NAME}: no Conv2d or Linear layer among targets {list(cfg.targets)}")
    units = _units(found, cfg.group_by)
    layers = list(units)
    base = count_flops(model, x)
    budget = cfg.flops_budget * base
    ratios = tuple(sorted(set(cfg.ratios)))

    def candidate(choice: dict[str, float]) -> tuple[nn.Module, float]:
        pruned = copy.deepcopy(model)
        compress_layers(pruned, choice, cfg, ctx, units)
        return pruned, count_flops(pruned, x)

    def objective(trial: Any) -> float:
        choice = {f: trial.suggest_categorical(f, ratios) for f in layers}
        pruned, flops = candidate(choice)
        while flops > budget and any(r < ratios[-1] for r in choice.values()):  # repair: one step up each
            choice = {f: ratios[min(ratios.index(r) + 1, len(ratios) - 1)] for f, r in choice.items()}
            pruned, flops = candidate(choice)
        trial.set_user_attr("flops_share", flops / base)
        trial.set_user_attr("choice", choice)
        if flops > budget:
            return -math.inf
        return _score(dict(ctx.eval_fn(pruned)), cfg.metric)  # type: ignore[misc]

    genes = {f: ratios for f in layers}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = _study.make_sampler(cfg.strategy, genes, ctx.seed, cfg.trials)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for r in ratios:  # the uniform settings first: the search must beat them
        study.enqueue_trial({f: r for f in layers})
    started = time.perf_counter()
    study.optimize(objective, n_trials=max(cfg.trials, len(ratios)), catch=(Exception,))
    scores = {t.number: float(t.value) for t in study.trials
              if t.value is not None and math.isfinite(t.value)}
    done = [t for t in study.trials if t.number in scores]
    if not done:
        smallest = min((t.user_attrs.get("flops_share", math.inf) for t in study.trials), default=math.inf)
        raise ConfigError(f"{_NAME}: no candidate met flops_budget {cfg.flops_budget}; the smallest reached "
                          f"{smallest:.3f} of the original FLOPs (allow larger ratios or a larger budget)")
    best = max(done, key=lambda t: scores[t.number])
    uniform = [t for t in done if len(set(t.user_attrs["choice"].values())) == 1]
    choice = {f: float(r) for f, r in best.user_attrs["choice"].items()}
    structure = compress_layers(model, choice, cfg, ctx, units)
    share = count_flops(model, x) / base
    stats = {"trials": float(len(study.trials)), "feasible": float(len(done)), "flops_share": round(share, 4),
             "best_score": scores[best.number], "seconds": round(time.perf_counter() - started, 1)}
    if uniform:
        stats["best_uniform_score"] = max(scores[t.number] for t in uniform)
    points = [(float(t.user_attrs["flops_share"]), scores[t.number]) for t in done]
    front = sorted(points[i] for i in _study.pareto_front(points, maximize=[False, True]))
    logger.info("%s: best %.4f (uniform best %s) at %.3f of the FLOPs after %d trials", _NAME,
                scores[best.number],
                stats.get("best_uniform_score"), share, len(study.trials))
    return Outcome(model=model, touched=tuple(structure), structure=structure, stats=stats,
                   layers={f: {"ratio": r} for key, r in choice.items() for f in units[key]},
                   fronts={"FLOPs share of the original|score (Pareto front of the trials)":
                           [list(p) for p in front]})
