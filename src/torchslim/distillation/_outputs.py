"""Reading model outputs and padding masks for distillation losses."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchslim.core import Context
from torchslim.core.outputs import first_tensor
from torchslim.errors import ConfigError, DataError

__all__ = ["first_tensor", "frozen_teacher", "logits_of", "padding_mask", "shape_mismatch"]


def logits_of(outputs: Any, who: str) -> torch.Tensor:
    """The logits (or embeddings) in a model's outputs.

    Raises:
        DataError: no tensor can be found in ``outputs``.
    """
    found = first_tensor(outputs)
    if found is None:
        raise DataError(f"{who}: cannot find logits in outputs of type {type(outputs).__name__} "
                        "(expected a tensor, an object with .logits or a tuple starting with a tensor)")
    return found


def shape_mismatch(who: str, what: str, student: torch.Size, teacher: torch.Size, hint: str) -> DataError:
    """The error for student and teacher tensors that cannot be compared."""
    return DataError(f"{who}: student {what} {tuple(student)} and teacher {what} {tuple(teacher)} "
                     f"cannot be matched; {hint}")


def padding_mask(
    inputs: Any, targets: Any, leading: torch.Size, ignore_index: int | None
) -> torch.Tensor | None:
    """Which rows count: True for real tokens, False for padding; None when all count.

    Padding is read from targets equal to ``ignore_index`` (the Hugging Face ``-100``
    convention) when the targets have the rows' shape, else from an ``attention_mask``
    entry of dict inputs.
    """
    if (ignore_index is not None and isinstance(targets, torch.Tensor)
            and targets.shape == leading and not targets.is_floating_point()):
        return targets != ignore_index
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    if isinstance(mask, torch.Tensor) and mask.shape == leading:
        return mask.to(torch.bool)
    return None


def frozen_teacher(ctx: Context, model: nn.Module, who: str) -> nn.Module:
    """``ctx.teacher`` in eval mode without gradients, on ``ctx.device``.

    Raises:
        ConfigError: there is no teacher, or it is the student itself.
    """
    teacher = ctx.teacher
    if teacher is None:
        raise ConfigError(f"{who} needs a teacher: run it through ts.compress (the original model "
                          "is the default teacher) or set ctx.teacher; found none")
    if teacher is model:
        raise ConfigError(f"{who}: the teacher is the student module itself; pass a copy "
                          "(copy.deepcopy(model)) as ctx.teacher")
    return teacher.to(ctx.device).eval().requires_grad_(False)
