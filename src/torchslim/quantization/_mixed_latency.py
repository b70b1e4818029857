"""``quantization.mixed`` under a latency budget: each Linear runs int8 or stays float.

Only widths with a fast kernel on the machine can buy latency, so the choice per layer is
between a ``DynamicQuantLinear`` (int8 weights and activations, ``quantization.dynamic``'s
kernel) and the float layer. Both sides of the trade are measured, not modelled:

- **sensitivity**: the relative squared error of the model's output on the calibration batches
  when that layer alone is int8 (additive across layers to first order, as HAWQ assumes);
- **cost**: the time the layer saves in int8, timed alone on its captured calibration input in
  each form (the fastest of the timed calls), scaled so that the savings add up to the measured
  difference between the all-float and the all-int8 model (``LatencyPlan``).

The allocation (``allocate``) keeps float the layers whose error per millisecond saved is
largest, as long as the predicted model latency stays within the budget; the converted model is
then timed again (``tighten``): over the budget, float layers go int8, cheapest error per
millisecond first, until the measurement fits, so the report shows the prediction next to a
measurement within the budget.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from torchslim.core import HookSet, surgery
from torchslim.core.layerwise import Call, model_call
from torchslim.core.outputs import first_tensor
from torchslim.errors import ConfigError, DataError
from torchslim.measure.latency import measure_latency
from torchslim.quantization.modules import DynamicQuantLinear

__all__ = ["FLOAT", "INT8", "LatencyPlan", "plan_latency", "tighten"]

logger = logging.getLogger(__name__)
INT8, FLOAT = 8, 32  # the options, named by their bits in the report
_REPEATS = 15


class LatencyPlan:
    """What ``plan_latency`` measured: per-layer errors and savings, and the two whole-model times.

    A layer's saving is its float time minus its int8 time, timed alone. Alone, layers do not
    add up to the model (caches, threads, the work between them), so the savings are scaled to
    sum to the measured difference between the all-float and the all-int8 model: the prediction
    is exact at both ends and shares the difference out in proportion in between.
    """

    def __init__(self, errors: dict[str, dict[int, float]], savings: dict[str, float],
                 float_ms: float, int8_ms: float) -> None:
        self.errors, self.float_ms, self.int8_ms = errors, float_ms, int8_ms
        total = sum(savings.values())
        factor = (float_ms - int8_ms) / total if total > 0 else 0.0
        # the knapsack's costs: keeping a layer float costs its (scaled) saving; int8 costs nothing
        self.costs = {f: {INT8: 0.0, FLOAT: s * factor} for f, s in savings.items()}

    def budget_ms(self, fraction: float, who: str) -> float:
        """What ``fraction`` of the float latency leaves above the all-int8 model; an error if
        even that one is slower."""
        if self.int8_ms > fraction * self.float_ms:
            raise ConfigError(f"{who}: latency_budget {fraction} is out of reach: with every selected layer "
                              f"in int8 the model measured {self.int8_ms / self.float_ms:.3f} of its float "
                              f"latency ({self.int8_ms:.2f} of {self.float_ms:.2f} ms); raise the budget")
        return fraction * self.float_ms - self.int8_ms

    def predicted(self, alloc: dict[str, int]) -> float:
        """Predicted latency of the model with ``alloc`` as a fraction of the float model's."""
        return (self.int8_ms + sum(self.costs[f][alloc[f]] for f in alloc)) / self.float_ms


def plan_latency(model: nn.Module, layers: dict[str, nn.Linear], batches: list[Any], who: str) -> LatencyPlan:
    """Measure each layer's int8 output error and saving, and the all-float and all-int8 model."""
    calls = [model_call(model, b) for b in batches]
    with torch.no_grad():  # not inference_mode: DynamicQuantLinear reads its weight's version counter
        reference = [_output(model, c, who) for c in calls]
        inputs = _layer_inputs(model, layers, calls[0])
        quantized = {f: DynamicQuantLinear.from_linear(layers[f]).eval() for f in inputs}
        errors: dict[str, dict[int, float]] = {}
        savings: dict[str, float] = {}
        for fqn, x in inputs.items():
            _swap(model, fqn, quantized[fqn])
            try:
                errors[fqn] = {INT8: _relative_error(model, calls, reference, who), FLOAT: 0.0}
            finally:
                _swap(model, fqn, layers[fqn])
            savings[fqn] = (_best_ms(lambda f=layers[fqn], x=x: f(x))
                            - _best_ms(lambda q=quantized[fqn], x=x: q(x)))
        float_ms, int8_ms = _whole_model_ms(model, layers, quantized, calls[0])
    return LatencyPlan(errors, savings, float_ms, int8_ms)


def _whole_model_ms(model: nn.Module, layers: dict[str, nn.Linear], quantized: Mapping[str, nn.Module],
                    call: Call, rounds: int = 3) -> tuple[float, float]:
    """The float model's time and its time with the ``quantized`` modules swapped in, timed in
    alternating rounds (fastest of each); the model is left with its float layers."""
    float_ms, int8_ms = float("inf"), float("inf")
    args, kwargs = call
    for _ in range(rounds):
        float_ms = min(float_ms, _best_ms(lambda: model(*args, **kwargs)))
        for fqn in quantized:
            _swap(model, fqn, quantized[fqn])
        try:
            int8_ms = min(int8_ms, _best_ms(lambda: model(*args, **kwargs)))
        finally:
            for fqn in quantized:
                _swap(model, fqn, layers[fqn])
    return float_ms, int8_ms


def tighten(plan: LatencyPlan, alloc: dict[str, int], budget: float, measure: Callable[[], float],
            convert: Callable[[str], None]) -> tuple[float, list[str]]:
    """Measure the model built from ``alloc``; while it is over ``budget``, move the float layer
    with the least error per millisecond saved to int8 (``convert`` it, update ``alloc``) and
    measure again.

    Layer savings are timed alone and the machine may be busy, so the prediction can miss by a
    few percent. The moves stop once the predicted savings added reach twice the first overshoot,
    so a noisy measurement cannot turn the whole model int8.

    Returns:
        The last measured fraction of the float latency and the layers moved, in order.
    """
    measured = measure()
    overshoot = (measured - budget) * plan.float_ms
    floats = sorted((f for f in alloc if alloc[f] == FLOAT),
                    key=lambda f: plan.errors[f][INT8] / max(plan.costs[f][FLOAT], 1e-12))
    moved: list[str] = []
    saved = 0.0
    while measured > budget and floats and saved < 2 * overshoot:
        fqn = floats.pop(0)
        convert(fqn)
        alloc[fqn] = INT8
        moved.append(fqn)
        saved += plan.costs[fqn][FLOAT]
        measured = measure()
    return measured, moved


def measure_fraction(model: nn.Module, layers: dict[str, nn.Linear], batch: Any) -> float:
    """The model's latency on one calibration batch as a fraction of its all-float form's.

    ``layers`` are the original float layers at their places. Both forms are timed now, in
    alternating rounds, so a machine that has grown busier since the plan was made slows both
    alike instead of inflating the fraction.
    """
    converted = {f: m for f in layers if (m := model.get_submodule(f)) is not layers[f]}
    for fqn in converted:
        _swap(model, fqn, layers[fqn])
    try:
        with torch.no_grad():
            float_ms, converted_ms = _whole_model_ms(model, layers, converted, model_call(model, batch))
    finally:
        for fqn, module in converted.items():
            _swap(model, fqn, module)
    return converted_ms / float_ms


def _best_ms(fn: Any) -> float:
    """The fastest of the timed calls: the least disturbed by other work on a shared machine,
    where a median can catch a whole layer waiting for a core."""
    return measure_latency(fn, warmup=3, repeats=_REPEATS)["latency_min_ms"]


def _swap(model: nn.Module, fqn: str, module: nn.Module) -> None:
    surgery.replace_modules(model, [(fqn, model.get_submodule(fqn))], lambda _f, _m: module)


def _output(model: nn.Module, call: Call, who: str) -> torch.Tensor:
    out = first_tensor(model(*call[0], **call[1]))
    if out is None:
        raise DataError(f"{who}: the model's output holds no tensor to compare (expected a tensor, "
                        ".logits, .last_hidden_state or a tuple starting with a tensor)")
    return out.float()


def _relative_error(model: nn.Module, calls: list[Call], reference: list[torch.Tensor], who: str) -> float:
    """``sum |y - y_ref|^2 / sum |y_ref|^2`` over the calibration batches."""
    num = den = 0.0
    for call, ref in zip(calls, reference, strict=True):
        num += float((_output(model, call, who) - ref).pow(2).sum())
        den += float(ref.pow(2).sum())
    return num / max(den, 1e-30)


def _layer_inputs(model: nn.Module, layers: dict[str, nn.Linear], call: Call) -> dict[str, torch.Tensor]:
    """The input each layer receives on one batch (its first positional argument)."""
    seen: dict[str, torch.Tensor] = {}

    def keep(fqn: str) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            seen.setdefault(fqn, args[0])
        return hook

    with HookSet() as hooks:
        for fqn, module in layers.items():
            hooks.forward_pre(module, keep(fqn))
        model(*call[0], **call[1])
    if missing := [f for f in layers if f not in seen]:
        logger.warning("layers not called on the calibration batch stay float: %s", ", ".join(missing))
    return seen
