"""One seeded training loop for fine-tuning, distillation, QAT and gradual pruning.

It checkpoints every epoch (``train-<epoch>.pt``) and resumes from the latest checkpoint to
the same result as an uninterrupted run: each epoch's data order and random state are
seeded from ``(seed, epoch)``, so nothing depends on how many epochs ran in this process.
Under ``torchrun`` it trains data-parallel without any change to the caller (see
``torchslim.train.distributed``): ``batch_size`` is the global batch and only rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchslim.core.context import Context, to_device
from torchslim.core.hooks import frozen
from torchslim.core.lifecycle import Step, TrainedMethod
from torchslim.errors import DataError
from torchslim.recipes.schema import TrainSpec
from torchslim.train import distributed
from torchslim.train.checkpoint import atomic_torch_save, latest_checkpoint, load_checkpoint

__all__ = ["fit", "learning_rate", "to_device", "task_loss"]

logger = logging.getLogger(__name__)
DEFAULT_LR = 1.0e-3  # a stage whose train block and methods name none


def task_loss(outputs: Any, targets: Any) -> torch.Tensor:
    """Cross-entropy on the outputs' logits (the default task loss)."""
    logits = getattr(outputs, "logits", outputs)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _epoch_batches(data: Any, spec: TrainSpec, seed: int, epoch: int) -> Iterable[Any]:
    torch.manual_seed(seed * 100_003 + epoch)  # dropout, shuffling of user loaders
    rank, size = distributed.world()
    if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        if size > 1:  # the single-process batches, each split into one shard per process
            shards = distributed.ShardedBatches(len(data), spec.batch_size, generator, rank, size)
            return torch.utils.data.DataLoader(data, batch_sampler=shards, generator=generator)
        return torch.utils.data.DataLoader(
            data, batch_size=spec.batch_size, shuffle=True, generator=generator
        )
    if size > 1:
        raise DataError(f"data-parallel training ({size} processes) needs ctx.train_data to be a "
                        f"Dataset with a length, to shard it; found {type(data).__name__}")
    return data  # type: ignore[no-any-return]


def _split(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0], batch[1]
    return batch, None


def learning_rate(spec: TrainSpec, methods: Sequence[TrainedMethod]) -> float:
    """The stage's peak learning rate: ``spec.lr``, else the methods' largest ``default_lr``, else 1e-3."""
    if spec.lr is not None:
        return spec.lr
    return max((m.default_lr for m in methods if m.default_lr is not None), default=DEFAULT_LR)


def _optimizer(params: Sequence[nn.Parameter], spec: TrainSpec, lr: float) -> torch.optim.Optimizer:
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=spec.weight_decay)
    cls = torch.optim.AdamW if spec.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=lr, weight_decay=spec.weight_decay)


def _plan(data: Any, spec: TrainSpec) -> tuple[int, int]:
    """(steps per epoch, total steps)."""
    try:
        per_epoch = len(_epoch_batches(data, spec, 0, 0))  # type: ignore[arg-type]
    except TypeError:
        per_epoch = spec.steps or 0
    if per_epoch == 0:
        raise DataError("the training data is empty (expected at least one batch)")
    total = spec.steps if spec.steps is not None else spec.epochs * per_epoch
    return per_epoch, total


@dataclasses.dataclass
class _Run:
    """Everything one training run needs between steps."""

    model: nn.Module
    methods: Sequence[TrainedMethod]
    spec: TrainSpec
    ctx: Context
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    teacher_fn: Any
    total: int
    forward: nn.Module
    history: list[float] | None = None
    bar: Any = None


def fit(
    model: nn.Module,
    spec: TrainSpec,
    methods: Sequence[TrainedMethod],
    ctx: Context,
    *,
    teacher: nn.Module | None = None,
    checkpoint_dir: Path | None = None,
    history: list[float] | None = None,
) -> nn.Module:
    """Train ``model`` with the task loss plus every method's terms; return it.

    Resumes from the latest ``train-<epoch>.pt`` in ``checkpoint_dir`` when one exists.
    Under ``torchrun`` (``WORLD_SIZE > 1``) every process calls it with the same arguments.

    Args:
        history: When given, the loss of every step (averaged over processes) is appended.
    """
    if teacher is not None:  # methods that hook the teacher (features, attention) find it here
        ctx = dataclasses.replace(ctx, teacher=teacher)
    with frozen(ctx.teacher):  # frozen while it teaches; the caller's flags come back afterwards
        return _fit(model, spec, methods, ctx, teacher, checkpoint_dir, history)


def _fit(model: nn.Module, spec: TrainSpec, methods: Sequence[TrainedMethod], ctx: Context,
         teacher: nn.Module | None, checkpoint_dir: Path | None, history: list[float] | None) -> nn.Module:
    was_training = model.training
    device = torch.device(ctx.device)
    distributed.init_from_env(device)
    model.to(device)
    if ctx.train_data is None:  # data-free methods make their own
        made = next((d for d in (m.synthesize(ctx) for m in methods) if d is not None), None)
        if made is None:
            raise DataError("this stage trains, but ctx.train_data is None (expected (inputs, targets) "
                            "batches, or a data-free method such as distillation.inversion in the stage)")
        ctx = dataclasses.replace(ctx, train_data=made)
    for method in methods:
        model = method.on_start(model, ctx)
    # Sorted by name: registration order can differ between a run and its resumption
    # (finalize re-registers baked tensors), and the optimizer state is stored by position.
    params = [p for _, p in sorted(model.named_parameters()) if p.requires_grad]
    params += [p for m in methods for p in m.parameters()]
    optimizer = _optimizer(params, spec, learning_rate(spec, methods))
    _, total = _plan(ctx.train_data, spec)
    run = _Run(model, methods, spec, ctx, params, optimizer, _scheduler(optimizer, spec, total),
               _teacher_fn(teacher, device), total, forward=model, history=history)
    epoch, step = _restore(checkpoint_dir, run)
    run.forward = distributed.wrap(model)  # after restoring: DDP broadcasts rank 0's weights
    distributed.broadcast([p for m in methods for p in m.parameters()])
    run.bar = _progress(ctx.progress and distributed.is_main(), total, step)
    while step < total:
        step = _run_epoch(run, epoch, step)
        epoch += 1
        if checkpoint_dir is not None and distributed.is_main():
            _save(checkpoint_dir, epoch, step, run)
        distributed.barrier()
    if run.bar is not None:
        run.bar.close()
    model.train(was_training)
    return model


def _scheduler(optimizer: torch.optim.Optimizer, spec: TrainSpec, total: int) -> Any:
    if spec.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    warm = max(min(total // 20, 100), 1)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / total)))


def _run_epoch(run: _Run, epoch: int, step: int) -> int:
    """Train until the data of ``epoch`` is used up or the step budget is; return the step."""
    run.model.train()
    device = torch.device(run.ctx.device)
    weight = math.prod(m.task_weight() for m in run.methods)
    loss_fn = run.ctx.loss_fn or task_loss
    seen, started, loss_sum, batches = 0, time.perf_counter(), 0.0, 0
    for batch in _epoch_batches(run.ctx.train_data, run.spec, run.ctx.seed, epoch):
        if step >= run.total:
            break
        inputs, targets = _split(to_device(batch, device))
        with _autocast(run.spec, device):  # the backward pass runs outside, as autocast wants
            outputs = run.forward(inputs)
            st = Step(step, inputs, targets, outputs, run.model, run.teacher_fn, total=run.total)
            loss = loss_fn(outputs, targets) * weight if weight else outputs_zero(outputs)
            for m in run.methods:
                term = m.extra_loss(st)
                loss = loss + term if term is not None else loss
        loss = loss.float()
        if not torch.isfinite(loss):
            raise DataError(f"training loss became {loss.item()} at step {step}; lower the lr")
        run.optimizer.zero_grad(set_to_none=True)
        loss = _backward(run, loss, _batch_size(inputs))
        if run.spec.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(run.params, run.spec.grad_clip)
        run.optimizer.step()
        run.scheduler.step()
        for m in run.methods:
            m.on_step(st)
        step, batches, loss_sum = step + 1, batches + 1, loss_sum + float(loss)
        if run.history is not None:
            run.history.append(float(loss))
        seen += _batch_size(inputs)
        if run.bar is not None:
            rate = seen / max(time.perf_counter() - started, 1e-9)
            run.bar.set_postfix(loss=f"{loss_sum / batches:.4f}", samples_s=f"{rate:,.0f}")
            run.bar.update(1)
    logger.info("epoch %d: mean loss %.4f over %d steps", epoch + 1, loss_sum / max(batches, 1), batches)
    return step


def _autocast(spec: TrainSpec, device: torch.device) -> torch.autocast:
    """bfloat16 autocast for ``precision: bf16`` (weights stay float32), else a disabled one."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.precision == "bf16")


def _backward(run: _Run, loss: torch.Tensor, local: int) -> torch.Tensor:
    """Backpropagate this process's share of the global mean loss; return the global loss."""
    if distributed.world()[1] == 1:
        loss.backward()  # type: ignore[no-untyped-call]
        return loss.detach()
    total = distributed.global_batch_size(local)
    shard = loss * distributed.shard_weight(local, distributed.world()[1], total)
    shard.backward()  # type: ignore[no-untyped-call]  # DDP averages the model's gradients
    distributed.sync_grads([p for m in run.methods for p in m.parameters()])
    return distributed.all_mean(shard.detach())


def outputs_zero(outputs: Any) -> torch.Tensor:
    """A zero loss attached to the graph (when the task loss has weight 0)."""
    logits = getattr(outputs, "logits", outputs)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    zero: torch.Tensor = logits.sum() * 0.0
    return zero


def _batch_size(inputs: Any) -> int:
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0]) if inputs.dim() else 1
    if isinstance(inputs, (list, tuple)) and inputs:
        return _batch_size(inputs[0])
    if isinstance(inputs, dict) and inputs:
        return _batch_size(next(iter(inputs.values())))
    return 1


def _teacher_fn(teacher: nn.Module | None, device: torch.device) -> Any:
    return None if teacher is None else teacher.to(device)  # frozen by fit


def _progress(show: bool, total: int, done: int) -> Any:
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, unit="step", dynamic_ncols=True, leave=False, mininterval=1.0)


def _save(folder: Path, epoch: int, step: int, run: _Run) -> None:
    state = {"epoch": epoch, "step": step, "model": run.model.state_dict(),
             "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
             "methods": [m.state_dict() for m in run.methods]}
    atomic_torch_save(state, folder / f"train-{epoch}.pt")
    for old in folder.glob("train-*.pt"):
        if old.name != f"train-{epoch}.pt":
            old.unlink()


def _restore(folder: Path | None, run: _Run) -> tuple[int, int]:
    path = latest_checkpoint(folder, "train") if folder is not None else None
    if path is None:
        return 0, 0
    state = load_checkpoint(path)
    run.model.load_state_dict(state["model"], strict=True)
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if len(state["methods"]) != len(run.methods):
        raise DataError(f"{path} was written by a stage with {len(state['methods'])} trained methods, "
                        f"this stage has {len(run.methods)}; remove the checkpoints folder to restart")
    for method, saved in zip(run.methods, state["methods"]):
        method.load_state_dict(saved)
    logger.info("resumed training from %s (epoch %d, step %d)", path, state["epoch"], state["step"])
    return int(state["epoch"]), int(state["step"])
