"""Wall-clock latency: warm up, then time repeated calls and report robust statistics.

The median is the headline number because it ignores the occasional scheduler hiccup; p90 shows
the tail and the minimum the best case. ``measure_latency`` times any callable, so the same code
times PyTorch models and ONNX Runtime sessions.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from torchslim.errors import ConfigError
from torchslim.measure._state import eval_mode, split_inputs

__all__ = ["measure_latency", "model_latency"]

logger = logging.getLogger(__name__)


def measure_latency(
    fn: Callable[[], Any], *, warmup: int = 5, repeats: int = 30, min_seconds: float = 0.0
) -> dict[str, float]:
    """Time ``fn()`` after ``warmup`` untimed calls.

    Args:
        fn: The work to time; called with no arguments. It must block until its result is
            ready (synchronize CUDA inside it).
        warmup: Untimed calls first (allocator, caches, lazy initialization).
        repeats: Minimum number of timed calls.
        min_seconds: Keep timing beyond ``repeats`` until this much time has been spent
            timing; steadies the numbers of very fast calls.

    Returns:
        ``latency_ms`` (median), ``latency_p90_ms``, ``latency_min_ms`` and ``repeats``
        (the number of timed calls).
    """
    if warmup < 0 or repeats < 1 or min_seconds < 0:
        raise ConfigError(
            f"latency: expected warmup >= 0, repeats >= 1 and min_seconds >= 0; "
            f"found warmup={warmup}, repeats={repeats}, min_seconds={min_seconds}"
        )
    for _ in range(warmup):
        fn()
    times: list[float] = []
    spent = 0.0
    while len(times) < repeats or spent < min_seconds:
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        times.append(elapsed * 1e3)
        spent += elapsed
    times.sort()
    p90 = times[max(math.ceil(0.9 * len(times)) - 1, 0)]  # nearest-rank percentile
    return {
        "latency_ms": statistics.median(times),
        "latency_p90_ms": p90,
        "latency_min_ms": times[0],
        "repeats": float(len(times)),
    }


def model_latency(
    model: nn.Module,
    example_inputs: Any,
    *,
    warmup: int = 5,
    repeats: int = 30,
    min_seconds: float = 0.0,
) -> dict[str, float]:
    """Time ``model(example_inputs)`` in eval mode under ``torch.inference_mode()``.

    Args:
        model: The model; its train/eval mode is restored afterwards.
        example_inputs: A tensor, a tuple of tensors or a dict of keyword arguments, already on
            the model's device.
        warmup: See ``measure_latency``.
        repeats: See ``measure_latency``.
        min_seconds: See ``measure_latency``.

    Returns:
        The statistics of ``measure_latency``.
    """
    args, kwargs = split_inputs(example_inputs)
    on_cuda = any(t.is_cuda for t in model.parameters())

    def call() -> None:
        model(*args, **kwargs)
        if on_cuda:
            torch.cuda.synchronize()  # CUDA kernels run asynchronously; wait for the result

    with eval_mode(model), torch.inference_mode():
        return measure_latency(call, warmup=warmup, repeats=repeats, min_seconds=min_seconds)
