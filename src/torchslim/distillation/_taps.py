"""Capturing intermediate activations of student and teacher, and pairing their layers.

A ``Recorder`` owns forward hooks (through ``HookSet``) that keep the latest input or output
of named modules. Hooks on the teacher record while the training driver runs it once per
step (``Step.teacher_outputs``), so several methods share one teacher pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
from collections.abc import Iterator, Sequence
from typing import Any, Literal, Protocol

import torch
from torch import nn

from torchslim.core import Context, HookSet, first_batch_inputs, select
from torchslim.distillation._outputs import first_tensor
from torchslim.errors import ConfigError, DataError, SelectorError

__all__ = [
    "Recorder",
    "Tap",
    "find_module",
    "last_layer",
    "map_layers",
    "mapped_taps",
    "parse_pairs",
    "probe",
    "removed_on_error",
    "sample_inputs",
]

Where = Literal["input", "output"]
_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclasses.dataclass(frozen=True)
class Tap:
    """A module's input or output, by fqn."""

    fqn: str
    where: Where = "output"

    def describe(self) -> str:
        return f"the {self.where} of {self.fqn!r}"


def parse_pairs(pairs: Sequence[str], who: str) -> list[tuple[str, str]]:
    """``"student_fqn:teacher_fqn"`` strings (or one fqn for both) as (student, teacher)."""
    parsed = []
    for i, pair in enumerate(pairs):
        student, sep, teacher = pair.partition(":")
        if not student or (sep and not teacher) or ":" in teacher:
            raise ConfigError(f"{who}.pairs[{i}]: expected 'student_fqn:teacher_fqn' or one fqn, "
                              f"found {pair!r}")
        parsed.append((student, teacher or student))
    return parsed


def find_module(model: nn.Module, fqn: str, who: str, role: str) -> nn.Module:
    """``model.get_submodule(fqn)``, or a SelectorError naming the ``role`` model and close names."""
    names = [n for n, _ in model.named_modules() if n]
    if fqn in names:
        return model.get_submodule(fqn)
    close = difflib.get_close_matches(fqn, names, n=5, cutoff=0.4)
    hint = f"closest names: {', '.join(close)}" if close else f"some names: {', '.join(names[:8])}"
    raise SelectorError(f"{who}: the {role} ({type(model).__name__}) has no module {fqn!r}; {hint}")


def last_layer(model: nn.Module, who: str) -> str:
    """Fqn of the last Linear/Conv layer in definition order, outside attention modules.

    Its input is the model's last hidden representation ("auto" hints).
    """
    inside_attention = {
        id(m) for outer in model.modules() if isinstance(outer, nn.MultiheadAttention)
        for m in outer.modules()
    }
    found = [n for n, m in model.named_modules()
             if n and isinstance(m, _LAYER_TYPES) and id(m) not in inside_attention]
    if not found:
        raise DataError(f"{who}: found no Linear or Conv layer in {type(model).__name__} to take the "
                        "last hidden features from; name layers with 'pairs'")
    last: str = found[-1]
    return last


def map_layers(n_student: int, n_teacher: int, rule: Literal["uniform", "last"]) -> list[int]:
    """The teacher layer index for each student layer.

    ``uniform`` spreads the student's layers over the teacher's (student i gets teacher
    ``(i + 1) * n_teacher // n_student - 1``, so last meets last, as in TinyBERT); ``last``
    pairs the student's layers with the teacher's last ``n_student`` layers.
    """
    if rule == "uniform":
        return [(i + 1) * n_teacher // n_student - 1 for i in range(n_student)]
    return [max(n_teacher - n_student + i, 0) for i in range(n_student)]


def mapped_taps(
    student: nn.Module, teacher: nn.Module, targets: Sequence[str], rule: Literal["uniform", "last"],
    who: str,
) -> list[tuple[Tap, Tap]]:
    """Outputs of the ``targets`` layers of both models, paired by ``rule``."""
    if not targets:
        raise ConfigError(f"{who}: mapping {rule!r} needs 'targets' (selectors of the layers to pair, "
                          r"e.g. 're:layers\.\d+'); found none")
    s_names = [n for n, _ in select(student, targets)]
    t_names = [n for n, _ in select(teacher, targets)]
    index = map_layers(len(s_names), len(t_names), rule)
    return [(Tap(s), Tap(t_names[j])) for s, j in zip(s_names, index)]


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def sample_inputs(ctx: Context, who: str) -> Any:
    """One input batch (``ctx.example_inputs`` or the first training batch) on ``ctx.device``."""
    inputs = ctx.example_inputs
    if inputs is None and ctx.train_data is not None:
        data = ctx.train_data
        batch = data[0] if isinstance(data, torch.utils.data.Dataset) else next(iter(data))
        inputs = first_batch_inputs(batch)
        if isinstance(data, torch.utils.data.Dataset) and isinstance(inputs, torch.Tensor):
            inputs = inputs.unsqueeze(0)  # one sample -> a batch of one
    if inputs is None:
        raise DataError(f"{who} needs one input batch to size its layers: set ctx.example_inputs "
                        "or ctx.train_data (found neither)")
    return _to_device(inputs, torch.device(ctx.device))


@torch.no_grad()
def probe(model: nn.Module, inputs: Any) -> None:
    """One forward pass in eval mode (BatchNorm statistics stay untouched); modes are restored."""
    modes = [(m, m.training) for m in model.modules()]  # submodules may differ (frozen BN)
    model.eval()
    try:
        model(**inputs) if isinstance(inputs, dict) else model(inputs)
    finally:
        for module, mode in modes:
            module.training = mode


class Recorder:
    """Keeps the latest tensor seen at each tap of one model."""

    def __init__(self, who: str) -> None:
        self.who = who
        self.values: dict[str, torch.Tensor] = {}
        self._hooks = HookSet()
        self._taps: dict[str, Tap] = {}

    def tap(self, model: nn.Module, tap: Tap, key: str, role: str) -> None:
        """Record ``tap`` of ``model`` under ``key``; ``role`` names the model in errors."""
        module = find_module(model, tap.fqn, self.who, role)
        self._taps[key] = tap
        if tap.where == "input":
            self._hooks.forward_pre(module, lambda m, args: self._keep(key, args))
        else:
            self._hooks.forward(module, lambda m, args, out: self._keep(key, out))

    def _keep(self, key: str, value: Any) -> None:
        found = first_tensor(value)
        if found is not None:
            self.values[key] = found

    def get(self, key: str, role: str) -> torch.Tensor:
        """The recorded tensor, or a DataError when the layer did not run."""
        if key not in self.values:
            raise DataError(f"{self.who}: {self._taps[key].describe()} in the {role} did not run in the "
                            "last forward pass (or gave no tensor); choose another layer")
        return self.values[key]

    def clear(self) -> None:
        """Forget recorded tensors (and the autograd graphs they hold)."""
        self.values.clear()

    def remove(self) -> None:
        """Remove every hook and recorded tensor."""
        self._hooks.remove()
        self.clear()


class _Removable(Protocol):
    def remove(self) -> None: ...


@contextlib.contextmanager
def removed_on_error(*recorders: _Removable) -> Iterator[None]:
    """Remove the recorders' hooks when the block raises: a failed stage leaves no hooks."""
    try:
        yield
    except BaseException:
        for recorder in recorders:
            recorder.remove()
        raise
