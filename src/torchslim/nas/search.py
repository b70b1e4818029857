"""Multi-trial architecture search, latency-aware and multi-objective, on Optuna.

Two spaces: a CNN space whose candidates train from scratch, and a Transformer space whose
candidates are students sliced from the model and briefly distilled from it.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from torchslim.core import (
    Context,
    MethodConfig,
    Outcome,
    check,
    config_from_dict,
    is_trained,
    register,
    resolve,
)
from torchslim.core.config import coerce_fields
from torchslim.errors import ConfigError, DataError, UnsupportedModuleError
from torchslim.measure.flops import count_flops
from torchslim.measure.params import count_params
from torchslim.nas import _study, supernet
from torchslim.nas.latency import measured_latency
from torchslim.nas.spaces import CNNArch, CNNSpace, SearchableCNN, build_cnn
from torchslim.nas.supernet import CNNSupernet, OneShot
from torchslim.nas.transformer import TransformerArch, TransformerSpace, model_dims, slice_student
from torchslim.recipes.schema import TrainSpec
from torchslim.train import fit

__all__ = [
    "NASSearchConfig", "SearchResult", "apply", "evaluate", "search", "study_result", "write_artifacts",
]

logger = logging.getLogger(__name__)

_NAME = "nas.search"
Objective = Literal["accuracy", "latency", "flops", "params"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class NASSearchConfig(MethodConfig):
    """Search a CNN or Transformer space for the Pareto front of accuracy vs latency (or FLOPs, params).

    Paper: Real et al., "Regularized Evolution for Image Classifier Architecture Search",
    AAAI 2019, https://arxiv.org/abs/1802.01548; Tan et al., "MnasNet: Platform-Aware Neural
    Architecture Search for Mobile", CVPR 2019, https://arxiv.org/abs/1807.11626

    Args:
        space: The search space. ``kind: cnn`` (the default; ``CNNSpace`` fields:
            base_widths, width_mults, depths, kernels, in_channels, num_classes, image_size) or
            ``kind: transformer`` (``TransformerSpace`` fields: layers, heads, ffn,
            ffn_targets, head_importance, hidden, hidden_targets): students sliced from
            the model.
        strategy: ``random``, ``evolution`` (regularized evolution), ``tpe`` or ``nsga2``
            (Optuna's samplers).
        trials: Finished trials the study stops at, over all workers: complete ones and
            ones whose training or scoring raised. A trial lost with its worker does not
            count (its architecture runs again, see Notes).
        objectives: What the front trades off: ``accuracy`` (``eval_fn(model)[metric]``
            after training, maximized) and ``latency`` (measured, ms), ``flops``, ``params``
            (minimized).
        metric: The key of ``ctx.eval_fn``'s result that the ``accuracy`` objective reads
            (e.g. ``lee_pearson`` for a sentence encoder).
        epochs_per_trial: Training epochs of each candidate on ``ctx.train_data``.
        lr: Peak learning rate of each candidate's training (unset: the train default).
        distill: Trained methods (registry keys with their fields) added to each candidate's
            training, e.g. ``distillation.logits``; the teacher is the model itself for a
            Transformer space and ``ctx.teacher`` for a CNN space.
        storage: Optuna storage URL shared by workers; SQLite ``<workdir>/nas.db`` by default,
            in memory without a workdir.
        study_name: Workers with the same storage and study name join one study.
        latency_budget_ms: The returned model is the most accurate trial at or under this
            latency; the most accurate trial overall when unset.
        one_shot: Weight sharing instead of training every candidate (CNN space only;
            ``OneShot`` fields: epochs, sandwich, finetune_epochs, calib_batches, path): one
            supernet is trained with the sandwich rule and in-place distillation, each trial
            scores a subnet sliced from it, and the chosen subnet is fine-tuned (with the
            ``distill`` methods; their teacher is ``ctx.teacher``, else the supernet's largest
            subnet).
        heartbeat_s: On a server storage (PostgreSQL), seconds between the heartbeats a
            running trial records.
        grace_period_s: On a server storage, seconds without a heartbeat after which a
            running trial counts as lost (its worker was killed) and is marked failed.

    Recipe:
        - method: nas.search
          strategy: nsga2
          trials: 40
          objectives: [accuracy, latency]
          space: {base_widths: [16, 32, 64], width_mults: [0.5, 1.0], depths: [0, 1, 2], kernels: [3, 5]}
          latency_budget_ms: 2.0
        - method: nas.search          # MiniLM students, distilled one epoch each
          space: {kind: transformer, layers: [2, 3, 4], heads: [6, 12], ffn: [384, 768, 1536]}
          metric: lee_pearson
          lr: 0.0005
          distill: [{method: distillation.logits, loss: cosine, temperature: 1.0, alpha: 1.0}]
        - method: nas.search          # hidden sizes too: narrower outputs, so hints with projections
          space: {kind: transformer, layers: [3, 6], heads: [6, 12], ffn: [768, 1536], hidden: [256, 384]}
          metric: lee_pearson
          distill:
            - {method: distillation.features, mapping: uniform, targets: ['re:bert\\.encoder\\.layer\\.\\d+']}
        - method: nas.search          # one-shot: 200 subnets of one supernet, the best fine-tuned
          trials: 200
          one_shot: {epochs: 10, sandwich: 2, finetune_epochs: 2}

    Notes:
        With a CNN space the model must be a ``torchslim.nas.SearchableCNN``
        (``build_cnn(arch)``); its ``body`` is replaced by the chosen architecture, trained for
        ``epochs_per_trial`` (continue with a train stage or ``distillation.logits``). With a
        Transformer space the model (any module with a Hugging Face-style config) becomes the
        chosen student: sliced by ``pruning.layers``, ``pruning.heads`` and ``pruning.channel``
        (by key, see ``torchslim.nas.transformer``; a ``hidden`` size narrows the residual
        stream and so the model's output), then trained with ``distill``; it needs
        ``ctx.calib_data`` (Block Influence) and ``ctx.train_data``. ``ts.load`` rebuilds
        either from structure.json.
        Latency is the best of 20 single-thread calls on ``ctx.example_inputs`` (robust on a
        busy machine).
        With ``one_shot`` the supernet (the space's largest network) trains once; a trial
        slices its architecture (first channels, first blocks, centre of each kernel),
        recomputes its BatchNorm statistics on ``calib_batches`` and scores it without
        training, so hundreds of trials take minutes. The supernet is saved to
        ``one_shot.path`` and reused by workers and later runs with the same space.
        Each trial is a fresh network seeded with ``ctx.seed + trial number``. A trial whose
        training or ``eval_fn`` raises is marked failed with the message and the study goes
        on. Several processes with one storage URL share the study; completed trials are
        committed as they finish, so a killed worker loses only its running trial. On
        PostgreSQL the next trial a surviving worker starts more than ``grace_period_s``
        after the lost trial's last heartbeat marks it failed and queues its architecture
        again (up to twice); on SQLite a lost trial stays running and is not counted.
        A trial whose sampler re-proposes an architecture already measured reuses that
        result (it counts towards ``trials``, records ``duplicate_of`` and adds no row).
        Each trial records the ``worker`` (host:pid) that ran it. Writes
        ``plots/nas_pareto.png`` and ``nas_trials.md`` into ``ctx.workdir``. Evolution draws
        random picks until ``trials // 3`` are complete, then mutates one gene of a
        tournament winner (first objective) per trial.
    """

    name: ClassVar[str] = _NAME
    space: CNNSpace | TransformerSpace = CNNSpace()
    strategy: Literal["random", "evolution", "tpe", "nsga2"] = "tpe"
    trials: int = 20
    objectives: tuple[Objective, ...] = ("accuracy", "latency")
    metric: str = "accuracy"
    epochs_per_trial: int = 1
    lr: float | None = None
    distill: tuple[Mapping[str, Any], ...] = ()
    storage: str | None = None
    study_name: str = "torchslim-nas"
    latency_budget_ms: float | None = None
    one_shot: OneShot | None = None
    heartbeat_s: int = 30
    grace_period_s: int = 120

    def __post_init__(self) -> None:
        check(isinstance(self.space, CNNSpace | TransformerSpace), f"{_NAME}: space must be a CNNSpace, a "
              f"TransformerSpace or a mapping of their fields, found {type(self.space).__name__}")
        check(self.one_shot is None or isinstance(self.space, CNNSpace), f"{_NAME}: one_shot trains a "
              "supernet of a CNN space; a transformer space already slices its students from the model")
        check(bool(self.metric), f"{_NAME}: metric must name a key of eval_fn's result, found ''")
        check(self.lr is None or self.lr > 0, f"{_NAME}: lr must be > 0, found {self.lr}")
        for i, raw in enumerate(self.distill):
            method = config_from_dict(raw, f"{_NAME}.distill[{i}]")
            check(is_trained(method), f"{_NAME}.distill[{i}]: {method.name} is a one-shot method; expected a "
                  "trained method such as distillation.logits")
        check(self.trials >= 1, f"{_NAME}: trials must be >= 1, found {self.trials}")
        check(self.epochs_per_trial >= 1,
              f"{_NAME}: epochs_per_trial must be >= 1, found {self.epochs_per_trial}")
        objectives = list(self.objectives)
        check("accuracy" in objectives and len(set(objectives)) == len(objectives),
              f"{_NAME}: objectives must include 'accuracy' and name each objective once, found {objectives}")
        unknown = set(objectives) - set(_study.DIRECTIONS)
        check(not unknown, f"{_NAME}: unknown objectives {sorted(unknown)}; expected some of "
              f"{sorted(_study.DIRECTIONS)}")
        check(self.latency_budget_ms is None or self.latency_budget_ms > 0,
              f"{_NAME}: latency_budget_ms must be > 0, found {self.latency_budget_ms}")
        check(bool(self.study_name), f"{_NAME}: study_name must not be empty")
        check(self.heartbeat_s >= 1, f"{_NAME}: heartbeat_s must be >= 1, found {self.heartbeat_s}")
        check(self.grace_period_s > self.heartbeat_s, f"{_NAME}: grace_period_s must exceed heartbeat_s "
              f"({self.heartbeat_s}), found {self.grace_period_s}")

    def to_dict(self) -> dict[str, Any]:
        """Plain data; the space becomes a mapping."""
        out = super().to_dict()
        out["space"] = self.space.to_dict()
        out["distill"] = [dict(raw) for raw in self.distill]
        out["one_shot"] = None if self.one_shot is None else dataclasses.asdict(self.one_shot)
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str = "method") -> NASSearchConfig:
        """Validate plain data; ``space`` is a mapping of ``CNNSpace`` or (``kind: transformer``)
        ``TransformerSpace`` fields."""
        fields = {k: v for k, v in raw.items() if k not in ("method", "space", "one_shot")}
        space = raw.get("space", {})
        if isinstance(space, Mapping):
            kind = space.get("kind", "cnn")
            if kind not in ("cnn", "transformer"):
                raise ConfigError(f"{where}.space.kind: expected 'cnn' or 'transformer', found {kind!r}")
            space_cls = TransformerSpace if kind == "transformer" else CNNSpace
            space = space_cls.from_mapping(space, f"{where}.space")
        one_shot = supernet.from_mapping(raw.get("one_shot"), f"{where}.one_shot")
        return cls(space=space, one_shot=one_shot, **coerce_fields(cls, fields, where))


@dataclasses.dataclass
class SearchResult:
    """What a search found.

    Attributes:
        rows: One dict per complete trial: trial, arch, accuracy, latency_ms, flops, params.
        failed: ``{"trial", "error"}`` per failed trial.
        front: The rows on the Pareto front of the config's objectives.
        best: The most accurate row within the latency budget.
        models: Trained models of trials this process ran and kept (the best within budget).
        structures: The structure changes of those models (how ``ts.load`` rebuilds them).
        supernet: The trained supernet of a one-shot search (None otherwise).
    """

    rows: list[dict[str, Any]]
    failed: list[dict[str, Any]]
    front: list[dict[str, Any]]
    best: dict[str, Any]
    models: dict[int, nn.Module]
    structures: dict[int, dict[str, dict[str, Any]]] = dataclasses.field(default_factory=dict)
    supernet: CNNSupernet | None = None


Arch = CNNArch | TransformerArch


def candidate(arch: Arch, cfg: NASSearchConfig, ctx: Context,
              base: nn.Module | None) -> tuple[nn.Module, dict[str, dict[str, Any]]]:
    """The untrained network of ``arch`` and its structure changes: built (CNN) or sliced from ``base``."""
    if isinstance(arch, CNNArch):
        return build_cnn(arch), {"body": {}}
    if base is None or not isinstance(cfg.space, TransformerSpace):
        raise ConfigError(f"{_NAME}: a transformer space slices its candidates from the model; "
                          "none was given")
    return slice_student(base, arch, cfg.space, ctx)


def evaluate(arch: Arch, cfg: NASSearchConfig, ctx: Context, seed: int, base: nn.Module | None = None,
             teacher: nn.Module | None = None,
             shared: tuple[CNNSupernet, list[Any]] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Make ``arch`` seeded with ``seed``, train it, score it and measure its cost.

    ``teacher`` distills it (default: a copy of ``base``, else ``ctx.teacher``); training
    freezes the teacher, so it must not be ``base`` itself. ``shared`` (a trained supernet
    and its calibration batches) makes a one-shot trial: ``arch`` is sliced, not trained.
    The row's ``structure`` holds the candidate's structure changes (how ``ts.load``
    rebuilds it).
    """
    torch.manual_seed(seed)
    model: nn.Module
    structure: dict[str, dict[str, Any]]
    if shared is not None and isinstance(arch, CNNArch):
        model, structure = supernet.subnet(shared[0], arch, shared[1], str(ctx.device)), {"body": {}}
    else:
        model, structure = candidate(arch, cfg, ctx, base)
        if teacher is None:
            teacher = copy.deepcopy(base) if base is not None and cfg.distill else ctx.teacher
        model = train(model, cfg, ctx, cfg.epochs_per_trial, teacher)
    assert ctx.eval_fn is not None  # checked before the search
    scores = ctx.eval_fn(model)
    if cfg.metric not in scores:
        raise DataError(f"{_NAME}: eval_fn returned {sorted(scores)}; expected the metric {cfg.metric!r}")
    inputs = ctx.example_inputs
    return model, {"arch": arch.to_dict(), "accuracy": float(scores[cfg.metric]),
                   "latency_ms": measured_latency(model, inputs), "flops": count_flops(model, inputs),
                   "params": count_params(model)[0], "structure": structure}


def train(model: nn.Module, cfg: NASSearchConfig, ctx: Context, epochs: int,
          teacher: nn.Module | None) -> nn.Module:
    """Train ``model`` ``epochs`` epochs with the ``distill`` methods; return it in eval mode."""
    methods = [resolve(m)(m) for m in (config_from_dict(raw, f"{_NAME}.distill") for raw in cfg.distill)]
    fit(model, TrainSpec(epochs=epochs, lr=cfg.lr), methods, ctx, teacher=teacher)
    for method in methods:
        model = method.on_end(model, ctx).model
    return model.eval()


def _check_ctx(ctx: Context) -> None:
    missing = [name for name in ("train_data", "eval_fn", "example_inputs") if getattr(ctx, name) is None]
    if missing:
        raise DataError(f"{_NAME}: needs ctx.{', ctx.'.join(missing)} (each candidate is trained on "
                        "train_data, scored by eval_fn and timed on example_inputs); found None")


def _check_space(cfg: NASSearchConfig, ctx: Context, base: nn.Module | None) -> None:
    """A space that does not fit the model, or a budget below the smallest candidate's latency,
    fails before any training."""
    if isinstance(cfg.space, TransformerSpace):
        if base is None:
            raise ConfigError(f"{_NAME}: a transformer space slices its candidates from the model; call "
                              "search(cfg, ctx, base=model)")
        cfg.space.check_model(model_dims(base))
    if cfg.latency_budget_ms is None:
        return
    smallest, _ = candidate(cfg.space.arch(cfg.space.extreme(largest=False)), cfg, ctx, base)
    reachable = measured_latency(smallest.eval(), ctx.example_inputs)
    if reachable > cfg.latency_budget_ms:
        raise ConfigError(f"{_NAME}: latency_budget_ms={cfg.latency_budget_ms} cannot be met: the smallest "
                          f"architecture of the space takes {reachable:.3f} ms on ctx.example_inputs")


def search(cfg: NASSearchConfig, ctx: Context, *, timeout: float | None = None,
           worker: int = 0, base: nn.Module | None = None) -> SearchResult:
    """Run (or join) the study until it holds ``cfg.trials`` finished trials or ``timeout`` s pass.

    ``worker`` offsets the sampler's seed so that processes joining one study at the same
    moment do not propose the same architectures. ``base`` is the model a transformer space
    slices its students from (and distills them from).
    """
    import optuna

    _check_ctx(ctx)
    storage = _study.open_storage(cfg.storage, ctx.workdir, heartbeat_s=cfg.heartbeat_s,
                                  grace_period_s=cfg.grace_period_s)
    _check_space(cfg, ctx, base)
    directions: list[Literal["minimize", "maximize"]] = [_study.DIRECTIONS[o] for o in cfg.objectives]
    genes = cfg.space.genes()
    try:
        study = optuna.create_study(storage=storage, study_name=cfg.study_name, load_if_exists=True,
                                    directions=directions)
    except ValueError as exc:
        raise ConfigError(f"{_NAME}: cannot join study {cfg.study_name!r}: {exc}") from exc
    if list(study.directions) != [optuna.study.StudyDirection[d.upper()] for d in directions]:
        raise ConfigError(f"{_NAME}: study {cfg.study_name!r} optimizes other objectives than "
                          f"{list(cfg.objectives)}; choose another study_name")
    seed = ctx.seed + 1000 * worker + len(study.get_trials(deepcopy=False))  # workers draw different picks
    study.sampler = _study.make_sampler(cfg.strategy, genes, seed, cfg.trials)
    teacher = copy.deepcopy(base) if base is not None and cfg.distill else None  # trials freeze their teacher
    models: dict[int, nn.Module] = {}
    structures: dict[int, dict[str, dict[str, Any]]] = {}
    kept: list[tuple[float, int]] = []
    shared = None
    if cfg.one_shot is not None and _study.spent(study) < cfg.trials:
        assert isinstance(cfg.space, CNNSpace)  # checked by the config
        shared = (supernet.load_or_train(cfg.space, cfg.one_shot, ctx, cfg.lr),
                  supernet.calibration(ctx, cfg.one_shot))

    def objective(trial: Any) -> tuple[float, ...]:
        arch = cfg.space.arch({name: trial.suggest_categorical(name, list(c)) for name, c in genes.items()})
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        twin = _study.twin(study, trial)
        if twin is not None:  # samplers re-propose architectures: reuse the measured result
            for key, value in twin.user_attrs.items():
                if key != "worker":
                    trial.set_user_attr(key, value)
            trial.set_user_attr("duplicate_of", twin.number)
            return tuple(twin.values)
        try:
            model, row = evaluate(arch, cfg, ctx, seed=ctx.seed + trial.number, base=base, teacher=teacher,
                                  shared=shared)
            values = tuple(float(row[_study.METRIC[o]]) for o in cfg.objectives)
            if not all(math.isfinite(v) for v in values):
                raise DataError(f"{_NAME}: trial {trial.number} scored {dict(zip(cfg.objectives, values))}; "
                                "expected finite numbers")
        except Exception as exc:
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}")
            raise
        structure = row.pop("structure")
        for key, value in row.items():
            trial.set_user_attr(key, value)
        budget = cfg.latency_budget_ms
        if (budget is None or row["latency_ms"] <= budget) and (not kept or row["accuracy"] > kept[0][0]):
            kept[:] = [(row["accuracy"], trial.number)]
            models.clear()
            models[trial.number] = model
            structures.clear()
            structures[trial.number] = structure
        return values

    def stop(study: Any, trial: Any) -> None:
        if _study.spent(study) >= cfg.trials:
            study.stop()

    if _study.spent(study) < cfg.trials:  # each worker runs at most cfg.trials: lost trials cannot loop
        study.optimize(objective, n_trials=cfg.trials, timeout=timeout, catch=(Exception,), callbacks=[stop])
    result = _collect(study, cfg, models, structures)
    result.supernet = shared[0] if shared is not None else None
    return result


def _collect(study: Any, cfg: NASSearchConfig, models: dict[int, nn.Module],
             structures: dict[int, dict[str, dict[str, Any]]] | None = None) -> SearchResult:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    rows = [{"trial": t.number, **t.user_attrs} for t in trials
            if t.state == TrialState.COMPLETE and "duplicate_of" not in t.user_attrs]
    lost = "lost: its worker stopped sending heartbeats (killed or disconnected)"
    failed = [{"trial": t.number, "error": t.user_attrs.get("error", t.system_attrs.get("fail_reason", lost))}
              for t in trials if t.state == TrialState.FAIL]
    if not rows:
        first = failed[0]["error"] if failed else "no trial ran"
        raise DataError(f"{_NAME}: no trial completed ({len(failed)} failed); the first error: {first}")
    maximize = [_study.DIRECTIONS[o] == "maximize" for o in cfg.objectives]
    points = [[float(r[_study.METRIC[o]]) for o in cfg.objectives] for r in rows]
    front = [rows[i] for i in _study.pareto_front(points, maximize)]
    budget = cfg.latency_budget_ms
    within = [r for r in rows if budget is None or r["latency_ms"] <= budget]
    if not within:
        fastest = min(r["latency_ms"] for r in rows)
        raise ConfigError(f"{_NAME}: no complete trial meets latency_budget_ms={budget}; the fastest took "
                          f"{fastest:.3f} ms (raise the budget or add smaller choices to the space)")
    best = max(within, key=lambda r: (r["accuracy"], -r["latency_ms"]))
    return SearchResult(rows=rows, failed=failed, front=front, best=best, models=models,
                        structures=structures or {})


def study_result(cfg: NASSearchConfig) -> SearchResult:
    """The trials, front and best row of the finished study ``cfg`` names (no new trials)."""
    import optuna

    storage = _study.open_storage(cfg.storage, None)
    try:
        study = optuna.load_study(study_name=cfg.study_name, storage=storage)
    except KeyError as exc:
        raise ConfigError(f"{_NAME}: no study {cfg.study_name!r} in {cfg.storage!r}") from exc
    return _collect(study, cfg, {})


def write_artifacts(result: SearchResult, folder: Path | None, metric: str = "accuracy") -> None:
    """Write ``nas_trials.md`` (front and all trials) and ``plots/nas_pareto.png`` into ``folder``."""
    if folder is not None:
        _study.write_report(result.rows, result.front, folder, metric)


@register(NASSearchConfig)
def apply(model: nn.Module, cfg: NASSearchConfig, ctx: Context) -> Outcome:
    """Search, then make ``model`` the most accurate architecture within the budget."""
    base: nn.Module | None = None
    if isinstance(cfg.space, TransformerSpace):
        base = model
    elif not isinstance(model, SearchableCNN):
        raise UnsupportedModuleError(
            f"{_NAME} searches its own CNN space and swaps the 'body' of a torchslim.nas.SearchableCNN "
            f"(build one with torchslim.nas.build_cnn(arch)), or slices students from a Transformer with "
            f"space kind: transformer; found a {type(model).__name__} and a CNN space")
    else:
        have, space = model.body.arch, cfg.space
        if (have.in_channels, have.num_classes) != (space.in_channels, space.num_classes):
            raise ConfigError(f"{_NAME}: space.in_channels/num_classes are {space.in_channels}/"
                              f"{space.num_classes} but the model has {have.in_channels}/{have.num_classes}")
    started = time.perf_counter()
    was_training = model.training
    result = search(cfg, ctx, base=base)
    trial = result.best["trial"]
    best, structure = result.models.get(trial), result.structures.get(trial)
    if best is None or structure is None:  # run by another worker: rebuild it the way the trial did
        kind = CNNArch if isinstance(cfg.space, CNNSpace) else TransformerArch
        arch = kind(**result.best["arch"])
        shared = None
        if result.supernet is not None and cfg.one_shot is not None:
            shared = (result.supernet, supernet.calibration(ctx, cfg.one_shot))
        best, row = evaluate(arch, cfg, ctx, seed=ctx.seed + trial, base=base, shared=shared)
        structure = row["structure"]
    write_artifacts(result, ctx.workdir, cfg.metric)
    finetuned = {}
    if cfg.one_shot is not None and cfg.one_shot.finetune_epochs > 0:
        teacher = ctx.teacher
        if teacher is None and cfg.distill and result.supernet is not None:  # in-place distillation goes on
            teacher = supernet.subnet(result.supernet, result.supernet.largest,
                                      supernet.calibration(ctx, cfg.one_shot), str(ctx.device))
        best = train(best, cfg, ctx, cfg.one_shot.finetune_epochs, teacher)
        assert ctx.eval_fn is not None  # checked before the search
        finetuned = {"finetuned_accuracy": float(ctx.eval_fn(best)[cfg.metric])}
    if isinstance(best, SearchableCNN):
        model.body = best.body
        best = model
    best.train(was_training)
    stats = {"trials_complete": float(len(result.rows)), "trials_failed": float(len(result.failed)),
             "pareto_points": float(len(result.front)), "best_accuracy": result.best["accuracy"],
             "best_latency_ms": result.best["latency_ms"], **finetuned,
             "seconds": time.perf_counter() - started}
    layers = {f"trial_{r['trial']}": {"accuracy": r["accuracy"], "latency_ms": r["latency_ms"],
                                      "flops": float(r["flops"]), "params": float(r["params"])}
              for r in sorted(result.front, key=lambda r: r["latency_ms"])}
    return Outcome(model=best, touched=tuple(structure), structure=structure, stats=stats, layers=layers)
