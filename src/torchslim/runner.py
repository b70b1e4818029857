"""Runs a recipe: stages in order, training through the driver, measuring, recording.

With ``ctx.workdir`` set, each finished stage is saved to ``workdir/stage-<i>.*`` and a running
stage checkpoints every epoch under ``workdir/<stage name>/``; ``resume=True`` continues from
there and reaches the same weights as an uninterrupted run.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from torch import nn

from torchslim.core import Context, Outcome, is_trained, resolve, structure, surgery
from torchslim.core.config import MethodConfig
from torchslim.core.hooks import frozen
from torchslim.core.storage import load_state_dict_into, save_state_dict
from torchslim.measure.metrics import environment, measure_all
from torchslim.recipes import Recipe, Stage, load_recipe
from torchslim.report.record import MetricsRow, OutcomeRow, RunRecord
from torchslim.train import distributed, fit

__all__ = ["Result", "apply", "compress"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Result:
    """The compressed model and the record of how it was made."""

    model: nn.Module
    record: RunRecord


def compress(model: nn.Module, recipe: Recipe | str | Path, ctx: Context, *, resume: bool = False) -> Result:
    """Run ``recipe`` on ``model``; return the compressed model and a record of the run.

    ``model`` may be changed in place; always continue with ``result.model``.
    Pass ``copy.deepcopy(model)`` to keep the original.
    """
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    was_training = model.training
    teacher = _teacher(model, recipe, ctx)
    record = _resume_record(model, ctx) if resume else None
    if record is None:
        record = RunRecord(recipe=recipe.to_dict(), environment=environment(ctx))
        shape = getattr(ctx.example_inputs, "shape", None)
        if shape is not None:
            record.environment["example_input_shape"] = list(shape)
            record.environment["example_input_dtype"] = str(ctx.example_inputs.dtype).removeprefix("torch.")
        record.metrics.append(MetricsRow("before", measure_all(model, ctx, recipe.measure)))
    with frozen(teacher):  # the user's teacher gets its own flags back afterwards
        for index, stage in enumerate(recipe.stages):
            if index < record.completed_stages:
                continue
            started = time.perf_counter()
            model = _run_stage(model, stage, ctx, record, teacher)
            logger.info("stage %r done in %.1f s", stage.name, time.perf_counter() - started)
            record.metrics.append(MetricsRow(stage.name, measure_all(model, ctx, recipe.measure)))
            record.completed_stages = index + 1
            _save_stage(model, ctx, record)
    model.train(was_training)
    return Result(model=model, record=record)


def apply(model: nn.Module, cfg: MethodConfig, ctx: Context, **train: Any) -> Result:
    """Run one method without a recipe; ``train`` fields (``epochs=1``) for trained methods."""
    from torchslim.recipes import TrainSpec

    spec = TrainSpec(**train) if train or is_trained(cfg) else None
    recipe = Recipe.single(cfg, spec)
    return compress(model, dataclasses.replace(recipe, measure=()), ctx)


def _teacher(model: nn.Module, recipe: Recipe, ctx: Context) -> nn.Module | None:
    needs = any(getattr(resolve(c), "needs_teacher", False) for s in recipe.stages for c in s.methods)
    if not needs:
        return None
    return ctx.teacher if ctx.teacher is not None else copy.deepcopy(model)


def _run_stage(model: nn.Module, stage: Stage, ctx: Context, record: RunRecord,
               teacher: nn.Module | None) -> nn.Module:
    hooks_before = _hook_count(model)
    trained = []
    for cfg in stage.methods:  # one-shot methods run in listed order, before training
        impl = resolve(cfg)
        if is_trained(cfg):
            trained.append(impl(cfg))
            continue
        started = time.perf_counter()
        outcome = impl(model, cfg, ctx)
        _record(record, stage.name, cfg, outcome, time.perf_counter() - started)
        model = outcome.model
    if stage.train is not None:
        started = time.perf_counter()
        folder = ctx.workdir / stage.name if ctx.workdir is not None else None
        model = fit(model, stage.train, trained, ctx, teacher=teacher, checkpoint_dir=folder)
        seconds = (time.perf_counter() - started) / max(len(trained), 1)
        for method in trained:
            outcome = method.on_end(model, ctx)
            _record(record, stage.name, method.cfg, outcome, seconds)
            model = outcome.model
    surgery.finalize(model)
    if _hook_count(model) > hooks_before:
        raise RuntimeError(f"stage {stage.name!r} left forward hooks on the model")
    return model


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _record(record: RunRecord, stage: str, cfg: MethodConfig, outcome: Outcome, seconds: float) -> None:
    record.outcomes.append(OutcomeRow(
        stage=stage, method=cfg.name, config=cfg.to_dict(), touched=list(outcome.touched),
        stats=dict(outcome.stats), layers=dict(outcome.layers), seconds=round(seconds, 3),
        fronts={k: [list(map(float, p)) for p in v] for k, v in outcome.fronts.items()},
    ))
    for fqn, change in outcome.structure.items():
        record.structure[fqn] = {**record.structure.get(fqn, {}), **change}


def _save_stage(model: nn.Module, ctx: Context, record: RunRecord) -> None:
    if ctx.workdir is None or not distributed.is_main():
        return
    ops = structure.capture(model, record.structure)
    save_state_dict(model, ctx.workdir / "stage.safetensors")
    state = {"record": record.to_dict(), "ops": ops}
    tmp = ctx.workdir / "stage.json.tmp"
    tmp.write_text(json.dumps(state, default=str))
    tmp.replace(ctx.workdir / "stage.json")


def _resume_record(model: nn.Module, ctx: Context) -> RunRecord | None:
    """Bring ``model`` to the last finished stage; None when there is nothing to resume."""
    if ctx.workdir is None or not (ctx.workdir / "stage.json").is_file():
        return None
    state = json.loads((ctx.workdir / "stage.json").read_text())
    structure.replay(model, state["ops"])
    load_state_dict_into(model, ctx.workdir / "stage.safetensors")
    logger.info("resuming after stage %d", state["record"]["completed_stages"])
    return RunRecord.from_dict(state["record"])
