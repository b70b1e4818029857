"""Context: everything a method may need besides the model and its config."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from torchslim.errors import DataError

__all__ = ["Context", "EvalFn", "calibration_inputs", "first_batch_inputs", "take_batches", "to_device"]


class EvalFn(Protocol):
    """The user's quality metric: ``eval_fn(model) -> {"accuracy": 0.91, ...}``."""

    def __call__(self, model: nn.Module) -> dict[str, float]: ...


@dataclasses.dataclass
class Context:
    """Data and helpers shared by every method of a run.

    Attributes:
        example_inputs: One input batch (a tensor or a tuple of tensors) for tracing and
            latency/FLOPs measurement.
        calib_data: Batches for calibration (quantization observers, importance scores).
        train_data: ``(inputs, targets)`` batches for trained stages; a DataLoader or a Dataset.
        eval_fn: The task metric, called before and after each stage.
        teacher: The teacher for distillation; ``None`` means the model as it was before the recipe.
        device: Where training and calibration run.
        seed: Seed for every random choice of the run.
        loss_fn: Task loss ``loss_fn(outputs, targets)``; cross-entropy when ``None``.
        workdir: Folder for checkpoints of running stages; none are written when ``None``.
        progress: Show progress bars.
    """

    example_inputs: Any = None
    calib_data: Iterable[Any] | None = None
    train_data: Any = None
    eval_fn: EvalFn | Callable[[nn.Module], dict[str, float]] | None = None
    teacher: nn.Module | None = None
    device: str | torch.device = "cpu"
    seed: int = 0
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None
    workdir: Path | None = None
    progress: bool = False

    def require_example_inputs(self, who: str) -> Any:
        """``example_inputs``, or a DataError naming ``who`` needs it."""
        if self.example_inputs is None:
            raise DataError(f"{who} needs ctx.example_inputs (one input batch); found None")
        return self.example_inputs

    def calibration_batches(self, who: str) -> Iterable[Any]:
        """Calibration batches (``calib_data``, else ``train_data``), or a DataError."""
        data = self.calib_data if self.calib_data is not None else self.train_data
        if data is None:
            raise DataError(f"{who} needs calibration data: set ctx.calib_data (found None)")
        return data


def first_batch_inputs(batch: Any) -> Any:
    """The model inputs of a batch: the first element of a (inputs, targets) pair."""
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0]
    return batch


def take_batches(data: Any, n: int, *, batch_size: int = 32) -> list[Any]:
    """The first ``n`` batches of a DataLoader / iterable, or of a Dataset (batched in order)."""
    if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        data = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    return list(itertools.islice(iter(data), n))


def to_device(batch: Any, device: torch.device | str) -> Any:
    """Move every tensor of a (nested) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def calibration_inputs(ctx: Context, n: int, who: str, device: torch.device | None = None) -> list[Any]:
    """The model inputs of the first ``n`` calibration batches (on ``device`` if given).

    Raises:
        DataError: no calibration data, or none of it yields a batch.
    """
    data = take_batches(ctx.calibration_batches(who), n)
    if not data:
        raise DataError(f"{who}: needs at least one calibration batch; ctx.calib_data gave none")
    inputs = [first_batch_inputs(b) for b in data]
    return inputs if device is None else [to_device(x, device) for x in inputs]
