"""All the measurements a recipe asks for, in one call, plus the environment they ran in.

``measure_all`` is what the runner calls before the first stage and after each one. It runs
the model in eval mode on ``ctx.device`` and leaves no trace: every submodule's train/eval flag,
every ``requires_grad`` and the model's device are as they were.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import logging
import platform
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim.core import Context
from torchslim.errors import ConfigError, DataError
from torchslim.measure._state import eval_mode, kept_requires_grad, on_device, to_device
from torchslim.measure.flops import count_flops
from torchslim.measure.latency import model_latency
from torchslim.measure.params import count_params
from torchslim.measure.size import size_bytes

__all__ = ["environment", "measure_all"]

logger = logging.getLogger(__name__)

_Measure = Callable[[nn.Module, Context, Any], dict[str, float]]


def _accuracy(model: nn.Module, ctx: Context, inputs: Any) -> dict[str, float]:
    if ctx.eval_fn is None:
        return {}
    with torch.no_grad():
        result = ctx.eval_fn(model)
    if not isinstance(result, Mapping):
        raise DataError(f"eval_fn must return a dict of numbers such as {{'accuracy': 0.9}}; "
                        f"found {type(result).__name__}")
    try:
        return {str(key): float(value) for key, value in result.items()}
    except (TypeError, ValueError) as exc:
        raise DataError(f"eval_fn must return a dict of numbers; found {dict(result)!r}") from exc


def _params(model: nn.Module, ctx: Context, inputs: Any) -> dict[str, float]:
    total, nonzero = count_params(model)
    return {"params": float(total), "params_nonzero": float(nonzero)}


def _size(model: nn.Module, ctx: Context, inputs: Any) -> dict[str, float]:
    return {"size_bytes": float(size_bytes(model))}


def _flops(model: nn.Module, ctx: Context, inputs: Any) -> dict[str, float]:
    return {} if inputs is None else {"flops": float(count_flops(model, inputs))}


def _latency(model: nn.Module, ctx: Context, inputs: Any) -> dict[str, float]:
    return {} if inputs is None else {"latency_ms": model_latency(model, inputs)["latency_ms"]}


# The names of torchslim.recipes.schema.MEASURES (measure/ may not import recipes/).
_MEASURES: dict[str, _Measure] = {
    "accuracy": _accuracy,
    "params": _params,
    "size": _size,
    "flops": _flops,
    "latency": _latency,
}


def measure_all(model: nn.Module, ctx: Context, names: Sequence[str]) -> dict[str, float]:
    """Measure ``model`` for each name in ``names``, in order.

    Args:
        model: The model, measured in eval mode on ``ctx.device`` and left unchanged.
        ctx: Supplies ``eval_fn``, ``example_inputs`` and ``device``.
        names: Recipe measure names: ``accuracy`` (every key ``ctx.eval_fn`` returns; skipped
            without one), ``params`` (``params``, ``params_nonzero``), ``size``
            (``size_bytes``), ``flops`` and ``latency`` (``latency_ms``); the last two are
            skipped without ``ctx.example_inputs``.

    Returns:
        Metric name -> value.
    """
    unknown = [name for name in names if name not in _MEASURES]
    if unknown:
        raise ConfigError(f"measure: unknown names {unknown}; expected some of {list(_MEASURES)}")
    inputs = ctx.example_inputs
    if inputs is not None:
        inputs = to_device(inputs, ctx.device)
    values: dict[str, float] = {}
    with kept_requires_grad(model), on_device(model, ctx.device), eval_mode(model):
        for name in names:
            values.update(_MEASURES[name](model, ctx, inputs))
    return values


def _version(distribution: str) -> str | None:
    """Installed version of a distribution, read from metadata without importing it."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    return platform.processor() or platform.machine()


def environment(ctx: Context) -> dict[str, Any]:
    """Versions, hardware and time of the run, for the record and the report header."""
    device = torch.device(ctx.device)
    env: dict[str, Any] = {
        "torchslim": _version("torchslim"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "onnxruntime": _version("onnxruntime"),
        "onnx": _version("onnx"),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(device)
    return env
