"""Mixed-precision weight-only quantization: per-layer widths chosen by sensitivity under a size budget."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar

import torch
from torch import nn

from torchslim.core import Context, MethodConfig, Outcome, calibration_inputs, check, register, surgery
from torchslim.core.layerwise import BlockStep, layerwise
from torchslim.errors import ConfigError, DataError
from torchslim.quantization._mixed_latency import INT8, measure_fraction, plan_latency, tighten
from torchslim.quantization.gptq import GPTQConfig, _gram, gptq_layers
from torchslim.quantization.modules import DynamicQuantLinear
from torchslim.quantization.packed import WeightOnlyLinear, dequantize_groups, quantize_groups
from torchslim.quantization.weight_only import check_bits_and_group, group_size_for, quantizable_linears

__all__ = ["MixedPrecisionConfig", "allocate", "allocate_bits", "apply"]

logger = logging.getLogger(__name__)
_NAME = "quantization.mixed"
QUANTIZERS = ("gptq", "rtn")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MixedPrecisionConfig(MethodConfig):
    """Give each Linear its own bit width: more bits where rounding hurts the layer's output most.

    Papers: Dong et al., "HAWQ-V2: Hessian Aware trace-Weighted Quantization of Neural Networks",
    NeurIPS 2020, https://arxiv.org/abs/1911.03852 (second-order sensitivity, Pareto-optimal
    bit allocation); Frantar et al., GPTQ, ICLR 2023 (the quantizer used per layer).

    Args:
        bits: The bit widths a layer may get, each 2..8.
        average_bits: Budget: the average code width over all quantized weights (the model size
            budget; scales and zero points cost the same at every width).
        latency_budget: Budget instead of ``average_bits``: the model's latency as a fraction
            of the float model's, measured on this machine on a calibration batch. Each layer
            then runs int8 (``quantization.dynamic``'s kernel) or stays float; ``bits``,
            ``group_size``, ``quantizer`` and ``symmetric`` apply to the size budget only.
        group_size: Input columns sharing one scale and zero point; 0: one group per row.
        quantizer: ``gptq`` (error compensation, needs calibration) or ``rtn`` (round to nearest).
        symmetric: Zero point fixed at the middle code.
        batches: Calibration batches read from ``ctx.calib_data``.
        targets: Layer selectors: an fqn, ``re:<regex>`` or ``type:<ClassName>``.
        ignore: Selectors removed from ``targets``.

    Recipe:
        - method: quantization.mixed
          bits: [3, 4, 8]
          average_bits: 4.5
          group_size: 64
        - method: quantization.mixed   # or: int8 where it costs least quality, within 60% of the time
          latency_budget: 0.6

    Notes:
        Sensitivity of layer ``l`` at ``b`` bits is its output error on the calibration inputs,
        ``tr(dW H dW^T)`` with ``H = X^T X`` and ``dW`` the round-to-nearest error (the quantity
        GPTQ minimises). The allocation minimises the summed error under the budget: a
        Lagrangian sweep over the exact multiple-choice knapsack gives the Pareto front of
        (average bits, error); the point closest below the budget is then filled greedily by the
        upgrades with the largest error drop per extra bit. The chosen widths are listed per
        layer in the report. Two calibration passes run (sensitivity, then GPTQ), block by
        block, so peak memory is the model plus one block's activations.
        Under ``latency_budget`` the sensitivity of a layer is instead the relative squared error
        of the model's output on up to 4 calibration batches with that layer alone in int8, and
        its cost is the time it saves in int8 (timed alone in each form, scaled so the savings
        add up to the measured all-float minus all-int8 model time); the layers kept float are
        those with the most error per millisecond saved. The converted model is then timed; if
        it measures over the budget (layer times do not add up exactly, the machine may be
        busy), float layers go int8, least error per millisecond first, until it fits or the
        predicted savings added reach twice the overshoot. The report gives the predicted and
        the measured latency fraction, the layers moved after measuring (``stats``) and the
        front of (latency fraction, summed error).
    """

    name: ClassVar[str] = _NAME
    bits: tuple[int, ...] = (3, 4, 8)
    average_bits: float = 4.5
    group_size: int = 64
    quantizer: str = "gptq"
    symmetric: bool = False
    batches: int = 128
    targets: tuple[str, ...] = ("type:Linear",)
    ignore: tuple[str, ...] = ()
    latency_budget: float | None = None

    def __post_init__(self) -> None:
        if self.latency_budget is not None:
            check(0 < self.latency_budget <= 1, f"{_NAME}: latency_budget must be in (0, 1] (a fraction of "
                                                f"the float model's latency); found {self.latency_budget!r}")
        check(len(self.bits) >= 1, f"{_NAME}: bits must list at least one width; found {list(self.bits)}")
        for b in self.bits:
            check_bits_and_group(_NAME, b, self.group_size)
        check(len(set(self.bits)) == len(self.bits), f"{_NAME}: bits has duplicates: {list(self.bits)}")
        check(min(self.bits) <= self.average_bits,
              f"{_NAME}: average_bits {self.average_bits} is below the smallest width {min(self.bits)}; "
              "no allocation can meet it")
        check(self.quantizer in QUANTIZERS, f"{_NAME}: quantizer must be one of {list(QUANTIZERS)}; "
                                            f"found {self.quantizer!r}")
        check(self.batches >= 1, f"{_NAME}: batches must be >= 1; found {self.batches!r}")


def allocate_bits(errors: dict[str, dict[int, float]], sizes: dict[str, int],
                  average_bits: float) -> tuple[dict[str, int], list[tuple[float, float]]]:
    """Widths minimising ``sum errors[l][b]`` with ``sum sizes[l] * b <= average_bits * sum sizes``.

    Returns the allocation and the Pareto front ``[(average bits, total error)]`` of the sweep.
    """
    total = sum(sizes.values())
    costs = {f: {b: float(sizes[f] * b) for b in e} for f, e in errors.items()}
    if sum(min(c.values()) for c in costs.values()) > average_bits * total + 1e-9:
        smallest = sum(min(c.values()) for c in costs.values()) / total
        raise ConfigError(f"{_NAME}: average_bits {average_bits} is below the smallest reachable "
                          f"average {smallest:.3f}")
    alloc, front = allocate(errors, costs, average_bits * total)
    return alloc, [(c / total, e) for c, e in front]


def allocate(errors: dict[str, dict[int, float]], costs: dict[str, dict[int, float]],
             budget: float) -> tuple[dict[str, int], list[tuple[float, float]]]:
    """One option per layer minimising ``sum errors[l][o]`` with ``sum costs[l][o] <= budget``.

    A Lagrangian sweep over the multiple-choice knapsack gives its Pareto front; the best point
    within the budget is then filled greedily by the upgrades with the largest error drop per
    unit of cost. The cheapest options must fit the budget (callers check and say why not).

    Returns:
        The chosen option per layer and the Pareto front ``[(total cost, total error)]``.
    """
    options = {f: sorted(e) for f, e in errors.items()}

    def choose(lam: float) -> dict[str, int]:
        return {f: min(options[f], key=lambda o: errors[f][o] + lam * costs[f][o]) for f in errors}  # noqa: B023

    def total(a: dict[str, int]) -> tuple[float, float]:
        return sum(costs[f][a[f]] for f in a), sum(errors[f][a[f]] for f in a)

    positive = [c for cs in costs.values() for c in cs.values() if c > 0] or [1.0]
    scale = max(max(e.values()) for e in errors.values()) / min(positive) + 1e-30
    front, best = [], {f: min(options[f], key=costs[f].__getitem__) for f in errors}
    for lam in (scale * 10.0 ** k for k in torch.linspace(2, -12, 141).tolist()):
        alloc = choose(lam)
        cost, err = total(alloc)
        front.append((cost, err))
        if cost <= budget + 1e-9 and err <= total(best)[1]:
            best = alloc
    used = total(best)[0]
    while True:  # greedy fill of what the sweep left of the budget
        upgrades = [((errors[f][best[f]] - errors[f][o]) / extra, f, o, extra)
                    for f in best for o in options[f]
                    if (extra := costs[f][o] - costs[f][best[f]]) > 0 and used + extra <= budget + 1e-9]
        gain = max(upgrades, default=None)
        if gain is None or gain[0] <= 0:
            break
        _, f, o, extra = gain
        best[f], used = o, used + extra
    pareto = sorted(set(front))
    return best, [p for i, p in enumerate(pareto) if all(q[1] > p[1] for q in pareto[:i])]


def _sensitivities(model: nn.Module, layers: dict[str, nn.Linear], groups: dict[str, int],
                   cfg: MixedPrecisionConfig, batches: list[Any]) -> dict[str, dict[int, float]]:
    errors: dict[str, dict[int, float]] = {}

    def measure(step: BlockStep) -> None:
        for fqn, module in step.layers.items():
            if fqn not in step.stats:
                continue
            h = step.stats[fqn].hessian().double()
            if not torch.isfinite(h).all():
                raise DataError(f"{_NAME}: the calibration inputs of {fqn} contain NaN or inf")
            assert isinstance(module, nn.Linear)
            w = module.weight.detach().float()
            errors[fqn] = {}
            for b in cfg.bits:
                codes, scale, zero = quantize_groups(w, b, groups[fqn], cfg.symmetric)
                dw = (dequantize_groups(codes, scale, zero) - w).double()
                errors[fqn][b] = float(((dw @ h) * dw).sum())

    outside = layerwise(model, batches, layers=layers, new_stat=_gram, on_block=measure)
    if outside:
        logger.warning("%s: %d selected layer(s) lie outside the model's repeated blocks and stay float "
                       "(select them alone in a second method to quantize them): %s",
                       _NAME, len(outside), ", ".join(outside))
    return errors


@register(MixedPrecisionConfig)
def apply(model: nn.Module, cfg: MixedPrecisionConfig, ctx: Context) -> Outcome:
    """Measure each layer's sensitivity per width, allocate under the budget, then quantize."""
    layers = quantizable_linears(model, cfg.targets, cfg.ignore, _NAME)
    if not layers:
        logger.warning("%s: no selected plain nn.Linear with an untied weight; nothing to do", _NAME)
        return Outcome(model=model)
    if cfg.latency_budget is not None:
        batches = calibration_inputs(ctx, min(cfg.batches, 4), _NAME)
        return _apply_latency(model, layers, cfg.latency_budget, batches)
    groups = {fqn: group_size_for(fqn, m.in_features, cfg.group_size, _NAME) for fqn, m in layers.items()}
    batches = calibration_inputs(ctx, cfg.batches, _NAME)
    errors = _sensitivities(model, layers, groups, cfg, batches)
    chosen = {f: layers[f] for f in layers if f in errors}
    alloc, front = allocate_bits(errors, {f: m.weight.numel() for f, m in chosen.items()}, cfg.average_bits)
    if cfg.quantizer == "gptq":
        gcfg = GPTQConfig(group_size=cfg.group_size, symmetric=cfg.symmetric)
        done = gptq_layers(model, chosen, alloc, groups, gcfg, batches, _NAME)
    else:
        def build(fqn: str, module: nn.Module) -> nn.Module:
            assert isinstance(module, nn.Linear)
            with torch.no_grad():
                codes, scale, zero = quantize_groups(module.weight, alloc[fqn], groups[fqn], cfg.symmetric)
                new = WeightOnlyLinear.from_codes(codes, scale, zero, alloc[fqn], module.bias)
            return new.to(module.weight.device).train(module.training)

        done = surgery.replace_modules(model, list(chosen.items()), build)
    sizes = {f: chosen[f].weight.numel() for f in done}
    average = sum(sizes[f] * alloc[f] for f in done) / max(sum(sizes.values()), 1)
    logger.info("%s: %d layers, average %.3f bits; Pareto front (bits, error): %s", _NAME, len(done),
                average, ", ".join(f"({a:.2f}, {e:.3g})" for a, e in front))
    stats: dict[str, float] = {"average_bits": round(average, 4), "layers": len(done)}
    for b in cfg.bits:
        stats[f"layers_{b}bit"] = sum(alloc[f] == b for f in done)
    return Outcome(model=model, touched=done, structure={f: {} for f in done}, stats=stats,
                   layers={f: {"bits": alloc[f], "group_size": groups[f]} for f in done},
                   fronts={"average bits per weight|summed output error (calibration)":
                           [list(p) for p in front]})


def _apply_latency(model: nn.Module, layers: dict[str, nn.Linear], budget: float,
                   batches: list[Any]) -> Outcome:
    """Int8 or float per layer, within ``budget`` of the float model's measured latency."""
    was_training = model.training
    model.eval()
    try:
        plan = plan_latency(model, layers, batches, _NAME)
        alloc, front = allocate(plan.errors, plan.costs, plan.budget_ms(budget, _NAME))
        predicted = plan.predicted(alloc)

        def convert(fqn: str) -> None:
            surgery.replace_modules(model, [(fqn, layers[fqn])],
                                    lambda f, _m: DynamicQuantLinear.from_linear(layers[f]))

        for fqn in [f for f in alloc if alloc[f] == INT8]:
            convert(fqn)
        measured, moved = tighten(plan, alloc, budget,
                                  lambda: measure_fraction(model, layers, batches[0]), convert)
    finally:
        model.train(was_training)
    done = tuple(f for f in alloc if alloc[f] == INT8)
    if moved:
        logger.info("%s: measured over the budget, so %d more layer(s) went int8: %s", _NAME, len(moved),
                    ", ".join(moved))
    if measured > budget * 1.05:
        logger.warning("%s: the converted model measured %.3f of the float latency against a budget of %.3f "
                       "(predicted %.3f); the machine may be busy, or layer times do not add up here",
                       _NAME, measured, budget, predicted)
    logger.info("%s: %d of %d layers int8; latency %.3f of float (predicted %.3f, budget %.3f)", _NAME,
                len(done), len(alloc), measured, predicted, budget)
    stats: dict[str, float] = {"layers_int8": len(done), "layers_float": len(alloc) - len(done),
                               "latency_fraction_predicted": round(predicted, 4),
                               "latency_fraction_measured": round(measured, 4),
                               "layers_moved_after_measuring": len(moved)}
    return Outcome(model=model, touched=done, structure={f: {} for f in done}, stats=stats,
                   layers={f: {"bits": alloc[f]} for f in alloc},
                   fronts={"latency / float latency (predicted)|summed output error (calibration)":
                           [[(plan.int8_ms + c) / plan.float_ms, e] for c, e in front]})
