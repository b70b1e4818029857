"""Automatic compression: per-layer pruning ratios and bit widths under a FLOPs, latency or size budget
(AMC- and HAQ-like), searched on Optuna."""

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

from torchslim.core import (
    Context,
    MethodConfig,
    Outcome,
    check,
    config_from_dict,
    register,
    select,
    take_batches,
)
from torchslim.core.batchnorm import batchnorms, recalibrate_batchnorm
from torchslim.core.registry import get_config_class
from torchslim.core.storage import serialized_size
from torchslim.errors import ConfigError, DataError, RecipeError, UnsupportedModuleError
from torchslim.measure.flops import count_flops
from torchslim.nas import _study
from torchslim.nas._registry import apply_by_key, merge_structure
from torchslim.nas.latency import measured_latency

__all__ = ["AutoCompressConfig", "apply", "compress_layers", "measure"]

logger = logging.getLogger(__name__)
_NAME = "nas.autocompress"
STRATEGIES = ("random", "tpe", "evolution")
MEASURES = ("flops", "latency", "size")
_BITS = "@bits"  # suffix of a unit's bit-width gene


@dataclasses.dataclass(frozen=True, kw_only=True)
class AutoCompressConfig(MethodConfig):
    """Search a pruning ratio and a bit width per layer that keep the most accuracy under a budget.

    Papers: He et al., "AMC: AutoML for Model Compression and Acceleration on Mobile Devices",
    ECCV 2018, https://arxiv.org/abs/1802.03494 (per-layer ratios found by search beat uniform
    ratios at the same FLOPs); Wang et al., "HAQ: Hardware-Aware Automated Quantization with
    Mixed Precision", CVPR 2019, https://arxiv.org/abs/1811.08886 (per-layer bit widths under a
    latency or size budget). The search runs on an Optuna study instead of an RL agent.

    Args:
        prune_method: The registry key applied to each layer (by key, never imported): a
            structured pruning method with ``ratio``, ``targets`` and ``ignore`` fields.
        ratios: The ratios a layer may get (0 leaves it whole).
        bits: The bit widths a layer may get from ``quantize`` (empty: no quantization).
        quantize: The methods (registry keys with their fields) that quantize a layer at its
            bit width, in order; ``bits`` and ``targets`` are filled in where a method has
            those fields. The default clusters weights (``sharing.kmeans``) and stores the
            indices Huffman-coded (``sharing.huffman``), so fewer bits make a smaller file.
        budget: Upper bounds as shares of the original model, all met by the result:
            ``flops`` (counted), ``latency`` (measured on ``ctx.example_inputs``) and
            ``size`` (bytes of the saved weights).
        trials: Candidates evaluated (each: compress a copy, measure it, call ``ctx.eval_fn``).
        strategy: ``random``, ``tpe`` or ``evolution`` (regularized evolution).
        metric: Key of ``ctx.eval_fn``'s result to maximise; empty: its first key.
        targets: Layers that get their own setting: an fqn, ``re:<regex>`` or ``type:<ClassName>``.
        ignore: Layers left alone (and passed to the pruning method's ``ignore``).
        importance: The ``importance`` field passed to ``prune_method`` (empty: its default).
        bn_batches: Calibration batches (``ctx.calib_data``, else ``train_data``) that give each
            candidate, and the result, fresh BatchNorm statistics before it is judged (adaptive
            BatchNorm as in EagleEye): a pruned layer feeds the next one fewer channels, the old
            statistics no longer fit, and every candidate of a deep network can score near
            chance. 0 keeps the original statistics. Models without BatchNorm skip it.
        group_by: A regular expression with one capture group: selected layers whose names
            give the same capture share one setting and are compressed in one call (e.g.
            ``features\\.(\\d+)\\.`` gives each MobileNetV2 block one ratio for its expansion
            and depthwise convs, which produce the same channels: structured pruning cuts a
            channel group only when all its producers are targeted). Empty: one per layer.

    Recipe:
        - method: nas.autocompress
          budget: {flops: 0.5}
          ratios: [0.0, 0.25, 0.5, 0.75]
          trials: 40
          ignore: ["classifier.3"]
          bn_batches: 8          # fresh BatchNorm statistics for each candidate (default 4)
        - method: nas.autocompress   # pruning and bit widths under a file-size budget
          budget: {size: 0.1}
          ratios: [0.0, 0.25, 0.5]
          bits: [2, 3, 4, 5, 6, 8]
          targets: ["type:Conv2d", "type:Linear"]

    Notes:
        A candidate over the budget is repaired before it is judged: every ratio below the
        largest moves one step up ``ratios`` and every bit width above the smallest one step
        down ``bits`` until the candidate fits (AMC and HAQ bound their agents' actions by
        the budget in the same spirit), so nearly every trial is spent inside the budget;
        the trial records the setting it was judged with (``choice``). A candidate that
        cannot fit even then scores minus infinity. The uniform settings (one ratio and one
        bit width for every layer) are always among the first candidates, so the result is
        never worse than the best uniform setting on ``eval_fn``. Latency is the best of 20
        single-thread calls (noisy on a busy machine; prefer ``flops`` or ``size`` there).
        Candidates are judged without fine-tuning, as AMC does; add a ``train`` block or a
        ``distillation.logits`` stage after it (clustered centroids stay trainable). Needs
        ``ctx.eval_fn`` and ``ctx.example_inputs``; without calibration data BatchNorm keeps its
        statistics (a warning says so). The per-layer settings chosen are listed
        in the report.
    """

    name: ClassVar[str] = _NAME
    prune_method: str = "pruning.channel"
    ratios: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)
    bits: tuple[int, ...] = ()
    quantize: tuple[Mapping[str, Any], ...] = ({"method": "sharing.kmeans"}, {"method": "sharing.huffman"})
    budget: Mapping[str, float] = dataclasses.field(default_factory=lambda: {"flops": 0.5})
    trials: int = 40
    strategy: str = "tpe"
    metric: str = ""
    targets: tuple[str, ...] = ("type:Conv2d",)
    ignore: tuple[str, ...] = ()
    importance: str = "l2"
    group_by: str = ""
    bn_batches: int = 4

    def __post_init__(self) -> None:
        check(len(self.ratios) >= 1 and all(0 <= r < 1 for r in self.ratios),
              f"{_NAME}: ratios must be a non-empty list of values in [0, 1); found {list(self.ratios)}")
        check(len(set(self.bits)) == len(self.bits) and all(1 <= b <= 16 for b in self.bits),
              f"{_NAME}: bits must be distinct widths in 1..16; found {list(self.bits)}")
        check(not self.bits or bool(self.quantize), f"{_NAME}: bits {list(self.bits)} need quantize methods; "
              "found none")
        for i, raw in enumerate(self.quantize):
            width = {"bits": self.bits[0]} if "bits" in _fields(raw) and self.bits else {}
            config_from_dict({**raw, **width}, f"{_NAME}.quantize[{i}]")
        check(bool(self.budget) and set(self.budget) <= set(MEASURES), f"{_NAME}: budget must bound some of "
              f"{list(MEASURES)} (e.g. {{flops: 0.5}}); found {dict(self.budget)}")
        for key, share in self.budget.items():
            check(isinstance(share, int | float) and 0 < share <= 1,
                  f"{_NAME}: budget.{key} must be a share in (0, 1]; found {share!r}")
        check(self.bn_batches >= 0, f"{_NAME}: bn_batches must be >= 0; found {self.bn_batches!r}")
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

    def to_dict(self) -> dict[str, Any]:
        """Plain data."""
        out = super().to_dict()
        out["quantize"] = [dict(raw) for raw in self.quantize]
        out["budget"] = dict(self.budget)
        return out


def _fields(raw: Mapping[str, Any]) -> set[str]:
    """The field names of the method ``raw`` names."""
    method = raw.get("method")
    if not isinstance(method, str):
        raise ConfigError(f"{_NAME}.quantize: each entry needs a 'method' key; found {dict(raw)}")
    try:
        cls = get_config_class(method)
    except RecipeError as exc:
        raise RecipeError(f"{_NAME}.quantize: {exc}") from exc
    return {f.name for f in dataclasses.fields(cls)}


def compress_layers(model: nn.Module, ratios: Mapping[str, float], cfg: AutoCompressConfig, ctx: Context,
                    units: Mapping[str, Sequence[str]] | None = None,
                    bits: Mapping[str, int] | None = None) -> dict[str, dict[str, Any]]:
    """Prune each unit at its ratio, then quantize it at its bit width, in place; the merged
    structure changes.

    ``units`` maps a setting's key to its layers (default: each key is one layer's name).
    Units with the same ratio (bit width) are compressed in one call.
    """
    structure: dict[str, dict[str, Any]] = {}
    extra = {"importance": cfg.importance} if cfg.importance else {}
    for ratio, layers in _grouped(ratios, units, skip=0.0):
        members = _present(model, layers)  # an earlier cut may have removed some with their group
        if not members:
            continue
        cut = {"method": cfg.prune_method, "ratio": ratio, "targets": members, "ignore": list(cfg.ignore),
               **extra}
        merge_structure(structure, apply_by_key(model, cut, ctx, _NAME).structure)
    if not bits:
        return structure
    for raw in cfg.quantize:
        fields = _fields(raw)
        if "bits" not in fields and "targets" not in fields:  # e.g. sharing.huffman: once, for every layer
            merge_structure(structure, apply_by_key(model, raw, ctx, _NAME).structure)
            continue
        for width, layers in _grouped(bits, units):
            members = _present(model, layers)
            if not members:
                continue
            filled = {**raw, **({"bits": width} if "bits" in fields else {}),
                      **({"targets": members} if "targets" in fields else {})}
            merge_structure(structure, apply_by_key(model, filled, ctx, _NAME).structure)
    return structure


def _grouped(settings: Mapping[str, Any], units: Mapping[str, Sequence[str]] | None,
             skip: Any = None) -> list[tuple[Any, list[str]]]:
    """(setting, the layers with it), in ascending order of the setting; ``skip`` is left out."""
    by_value: dict[Any, list[str]] = {}
    for key, value in settings.items():
        if value != skip:
            by_value.setdefault(value, []).extend(units[key] if units is not None else [key])
    return sorted(by_value.items())


def _present(model: nn.Module, layers: Sequence[str]) -> list[str]:
    """The ``layers`` the model still has (read when the call is made: cuts remove layers)."""
    names = dict(model.named_modules())
    return [f for f in layers if f in names]


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


def measure(model: nn.Module, x: Any, keys: Sequence[str]) -> dict[str, float]:
    """FLOPs, latency (ms) and saved-weight bytes of ``model``, those named in ``keys``."""
    out: dict[str, float] = {}
    if "flops" in keys:
        out["flops"] = float(count_flops(model, x))
    if "latency" in keys:
        out["latency"] = measured_latency(model.eval(), x)
    if "size" in keys:
        out["size"] = float(serialized_size(model))
    return out


def _smaller(choice: dict[str, Any], genes: Mapping[str, tuple[Any, ...]]) -> dict[str, Any]:
    """Each ratio one step up its choices, each bit width one step down (the repair step)."""
    out = {}
    for gene, value in choice.items():
        options = genes[gene]
        i = options.index(value)
        out[gene] = options[max(i - 1, 0)] if gene.endswith(_BITS) else options[min(i + 1, len(options) - 1)]
    return out


def _bn_batches(model: nn.Module, cfg: AutoCompressConfig, ctx: Context) -> list[Any]:
    """The batches that give each candidate its BatchNorm statistics (none: keep the original ones)."""
    if cfg.bn_batches == 0 or not batchnorms(model):
        return []
    if ctx.calib_data is None and ctx.train_data is None:
        logger.warning("%s: no ctx.calib_data or train_data; candidates are judged with the original "
                       "BatchNorm statistics (set bn_batches: 0 to silence this)", _NAME)
        return []
    batches = take_batches(ctx.calibration_batches(_NAME), cfg.bn_batches)
    check(bool(batches), f"{_NAME}: the calibration data is empty; expected at least one batch for "
                         f"BatchNorm statistics (or bn_batches: 0)")
    return batches


def _refresh(model: nn.Module, batches: list[Any]) -> None:
    """BatchNorm statistics of ``batches`` (if any), keeping the model's training flag."""
    if batches:
        training = model.training
        device = next((p.device for p in model.parameters()), "cpu")
        recalibrate_batchnorm(model, batches, _NAME, device).train(training)


def _split(choice: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, int]]:
    """(ratio per unit, bit width per unit) of a trial's genes."""
    ratios = {k: float(v) for k, v in choice.items() if not k.endswith(_BITS)}
    return ratios, {k[: -len(_BITS)]: int(v) for k, v in choice.items() if k.endswith(_BITS)}


@register(AutoCompressConfig)
def apply(model: nn.Module, cfg: AutoCompressConfig, ctx: Context) -> Outcome:
    """Search per-layer settings on copies of ``model``, then compress ``model`` with the best."""
    import optuna

    if ctx.eval_fn is None:
        raise DataError(f"{_NAME}: needs ctx.eval_fn to judge candidates")
    x = ctx.require_example_inputs(_NAME)
    found = [f for f, m in select(model, cfg.targets, cfg.ignore) if isinstance(m, nn.Conv2d | nn.Linear)]
    if not found:
        raise UnsupportedModuleError(f"{_NAME}: no Conv2d or Linear layer among targets {list(cfg.targets)}")
    units = _units(found, cfg.group_by)
    keys = sorted(set(cfg.budget) | {"flops"})
    base = measure(model, x, keys)
    calib = _bn_batches(model, cfg, ctx)
    genes: dict[str, tuple[Any, ...]] = {u: tuple(sorted(set(cfg.ratios))) for u in units}
    if cfg.bits:
        genes.update({u + _BITS: tuple(sorted(cfg.bits)) for u in units})

    def candidate(choice: dict[str, Any]) -> tuple[nn.Module, dict[str, float]]:
        compressed = copy.deepcopy(model)
        ratios, bits = _split(choice)
        compress_layers(compressed, ratios, cfg, ctx, units, bits=bits)
        _refresh(compressed, calib)
        return compressed, {k: v / base[k] for k, v in measure(compressed, x, keys).items()}

    def fits(shares: dict[str, float]) -> bool:
        return all(shares[k] <= limit for k, limit in cfg.budget.items())

    def objective(trial: Any) -> float:
        choice = {g: trial.suggest_categorical(g, options) for g, options in genes.items()}
        compressed, shares = candidate(choice)
        while not fits(shares) and _smaller(choice, genes) != choice:  # repair: one step smaller each
            choice = _smaller(choice, genes)
            compressed, shares = candidate(choice)
        trial.set_user_attr("shares", shares)
        trial.set_user_attr("choice", choice)
        if not fits(shares):
            return -math.inf
        return _score(dict(ctx.eval_fn(compressed)), cfg.metric)  # type: ignore[misc]

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize",
                                sampler=_study.make_sampler(cfg.strategy, genes, ctx.seed, cfg.trials))
    uniform = _uniform(genes)
    for pick in uniform:  # the uniform settings first: the search must beat them
        study.enqueue_trial(pick)
    started = time.perf_counter()
    study.optimize(objective, n_trials=max(cfg.trials, len(uniform)), catch=(Exception,))
    return _finish(model, cfg, ctx, study, units, (x, calib), base, keys, time.perf_counter() - started)


def _uniform(genes: Mapping[str, tuple[Any, ...]]) -> list[dict[str, Any]]:
    """Every setting that gives all units one ratio (and one bit width)."""
    ratios = next(iter(genes.values()))
    widths = next((options for g, options in genes.items() if g.endswith(_BITS)), (None,))
    return [{g: (b if g.endswith(_BITS) else r) for g in genes} for r in ratios for b in widths]


def _finish(model: nn.Module, cfg: AutoCompressConfig, ctx: Context, study: Any, units: dict[str, list[str]],
            inputs: tuple[Any, list[Any]], base: dict[str, float], keys: list[str],
            seconds: float) -> Outcome:
    """Compress ``model`` with the best trial's setting; the outcome with the search's statistics."""
    scores = {t.number: float(t.value) for t in study.trials
              if t.value is not None and math.isfinite(t.value)}
    done = [t for t in study.trials if t.number in scores]
    if not done:
        reached = {k: min((t.user_attrs.get("shares", {}).get(k, math.inf) for t in study.trials),
                          default=math.inf) for k in cfg.budget}
        raise ConfigError(f"{_NAME}: no candidate met budget {dict(cfg.budget)}; the smallest reached "
                          + ", ".join(f"{k} {v:.3f}" for k, v in reached.items())
                          + " of the original (allow larger ratios, fewer bits or a larger budget)")
    best = max(done, key=lambda t: scores[t.number])
    ratios, bits = _split(best.user_attrs["choice"])
    x, calib = inputs
    structure = compress_layers(model, ratios, cfg, ctx, units, bits=bits)
    _refresh(model, calib)
    shares = {k: v / base[k] for k, v in measure(model, x, keys).items()}
    stats = {"trials": float(len(study.trials)), "feasible": float(len(done)),
             "best_score": scores[best.number], **{f"{k}_share": round(v, 4) for k, v in shares.items()},
             "seconds": round(seconds, 1), "bn_batches": float(len(calib))}
    uniform = [t for t in done
               if all(len(set(part.values())) <= 1 for part in _split(t.user_attrs["choice"]))]
    if uniform:
        stats["best_uniform_score"] = max(scores[t.number] for t in uniform)
    first = next(iter(cfg.budget))
    points = [(float(t.user_attrs["shares"][first]), scores[t.number]) for t in done]
    front = sorted(points[i] for i in _study.pareto_front(points, maximize=[False, True]))
    logger.info("%s: best %.4f (uniform best %s) at %s after %d trials", _NAME, scores[best.number],
                stats.get("best_uniform_score"), shares, len(study.trials))
    layers = {f: {"ratio": r, **({"bits": float(bits[key])} if key in bits else {})}
              for key, r in ratios.items() for f in units[key]}
    title = f"{first} share of the original|score (Pareto front of the trials)"
    return Outcome(model=model, touched=tuple(structure), structure=structure, stats=stats, layers=layers,
                   fronts={title: [list(p) for p in front]})
