"""quantization.mixed: optimal bit allocation under a budget, per-layer widths on a tiny Llama, reload."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import torchslim as ts
from tiny_llama import tiny_llama, token_batches
from torchslim.errors import ConfigError
from torchslim.export import load, save
from torchslim.quantization import WeightOnlyLinear
from torchslim.quantization.mixed import MixedPrecisionConfig, allocate, allocate_bits
from torchslim.quantization.modules import DynamicQuantLinear
from torchslim.recipes import Recipe


@pytest.mark.parametrize("seed", range(5))
def test_allocation_matches_brute_force(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    layers = [f"l{i}" for i in range(5)]
    sizes = {f: int(torch.randint(1, 10, (1,), generator=g)) * 100 for f in layers}
    errors = {}
    for f in layers:  # error falls with bits, at a layer-specific rate
        base = float(torch.rand(1, generator=g)) * 10 + 0.1
        errors[f] = {b: base * 4.0 ** (-b) * (1 + 0.1 * float(torch.rand(1, generator=g))) for b in (2, 3, 4, 8)}
    budget = 4.0
    alloc, front = allocate_bits(errors, sizes, budget)
    total = sum(sizes.values())
    assert sum(sizes[f] * alloc[f] for f in layers) <= budget * total
    best = min((dict(zip(layers, combo, strict=True)) for combo in itertools.product((2, 3, 4, 8), repeat=5)
                if sum(sizes[f] * b for f, b in zip(layers, combo, strict=True)) <= budget * total),
               key=lambda a: sum(errors[f][a[f]] for f in layers))
    ours = sum(errors[f][alloc[f]] for f in layers)
    optimum = sum(errors[f][best[f]] for f in layers)
    assert ours <= optimum * 1.05  # the sweep + greedy fill lands at (or next to) the exact optimum
    bits = [p[0] for p in front]
    errs = [p[1] for p in front]
    assert bits == sorted(bits) and errs == sorted(errs, reverse=True)  # a Pareto front


def test_unreachable_budget_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="smallest"):
        MixedPrecisionConfig(bits=(4, 8), average_bits=3.0)
    with pytest.raises(ConfigError, match="bits"):
        MixedPrecisionConfig(bits=(1, 4))
    with pytest.raises(ConfigError, match="quantizer"):
        MixedPrecisionConfig(quantizer="awq")


@pytest.mark.parametrize("quantizer", ["rtn", "gptq"])
def test_tiny_llama_gets_mixed_widths_within_budget_and_reloads(quantizer: str, tmp_path: Path) -> None:
    build = lambda: tiny_llama(layers=2)  # noqa: E731
    batches = token_batches(vocab=128)
    x = batches[0]
    ctx = ts.Context(calib_data=batches)
    cfg = MixedPrecisionConfig(bits=(2, 4, 8), average_bits=4.0, group_size=32, quantizer=quantizer)
    result = ts.compress(build(), Recipe.single(cfg), ctx)
    layers = {f: m for f, m in result.model.named_modules() if isinstance(m, WeightOnlyLinear)}
    assert len(layers) == 14
    widths = {m.bits for m in layers.values()}
    assert len(widths) > 1, "a mixed allocation should use more than one width"
    sizes = {f: m.out_features * m.in_features for f, m in layers.items()}
    average = sum(sizes[f] * layers[f].bits for f in layers) / sum(sizes.values())
    assert average <= 4.0 + 1e-9
    with torch.no_grad():
        out = result.model(x).logits
    save(result, tmp_path / "run")
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "run", build)(x).logits, out, rtol=0, atol=0)


@pytest.mark.parametrize("seed", range(3))
def test_allocation_with_any_costs_matches_brute_force(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    layers = [f"l{i}" for i in range(6)]
    errors = {f: {8: float(torch.rand(1, generator=g)), 32: 0.0} for f in layers}
    costs = {f: {8: float(torch.rand(1, generator=g)), 32: 1.0 + float(torch.rand(1, generator=g))} for f in layers}
    budget = 0.6 * sum(c[32] for c in costs.values())
    alloc, front = allocate(errors, costs, budget)
    assert sum(costs[f][alloc[f]] for f in layers) <= budget + 1e-9
    feasible = (dict(zip(layers, combo, strict=True)) for combo in itertools.product((8, 32), repeat=6))
    best = min((a for a in feasible if sum(costs[f][a[f]] for f in layers) <= budget),
               key=lambda a: sum(errors[f][a[f]] for f in layers))
    ours, optimum = (sum(errors[f][a[f]] for f in layers) for a in (alloc, best))
    assert ours <= optimum * 1.25 + 1e-9  # the knapsack sweep lands at or next to the optimum
    assert [p[0] for p in front] == sorted(p[0] for p in front)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 256), nn.ReLU(),
                         nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 10))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Layer timings on one thread: on a shared machine a second thread waits for a core per op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_latency_budget_mixes_int8_and_float_layers_and_reloads(tmp_path: Path) -> None:
    batches = [torch.randn(256, 256, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    cfg = MixedPrecisionConfig(latency_budget=0.95)
    result = ts.compress(_mlp(), Recipe.single(cfg), ts.Context(calib_data=batches))
    int8 = [f for f, m in result.model.named_modules() if isinstance(m, DynamicQuantLinear)]
    kept = [f for f, m in result.model.named_modules() if type(m) is nn.Linear]
    assert int8, "a budget below the float latency needs int8 layers"
    assert len(int8) + len(kept) == 4
    stats = result.record.outcomes[0].stats
    assert stats["layers_int8"] == len(int8)
    assert stats["latency_fraction_predicted"] <= 0.95
    with torch.no_grad():
        out = result.model(batches[0])
    save(result, tmp_path / "run")
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "run", _mlp)(batches[0]), out, rtol=0, atol=0)


def test_tighten_moves_the_cheapest_float_layers_to_int8_until_the_measurement_fits() -> None:
    from torchslim.quantization._mixed_latency import FLOAT, INT8, LatencyPlan, tighten

    errors = {"a": {INT8: 1.0, FLOAT: 0.0}, "b": {INT8: 2.0, FLOAT: 0.0}, "c": {INT8: 9.0, FLOAT: 0.0},
              "d": {INT8: 0.1, FLOAT: 0.0}}
    plan = LatencyPlan(errors, {"a": 10.0, "b": 10.0, "c": 10.0, "d": 10.0}, float_ms=100.0, int8_ms=60.0)
    converted: list[str] = []

    def run(alloc: dict[str, int], miss: float) -> tuple[float, list[str]]:
        converted.clear()
        # the model measures the prediction plus a systematic miss (a fraction of the float latency)
        return tighten(plan, alloc, 0.8, lambda: plan.predicted(alloc) + miss, converted.append)

    alloc = {"a": FLOAT, "b": FLOAT, "c": FLOAT, "d": INT8}  # predicted 0.9: 0.15 over 0.8 with the miss
    measured, moved = run(alloc, 0.05)
    assert moved == converted == ["a", "b"]  # least error per millisecond saved first; c (9.0) stays float
    assert alloc == {"a": INT8, "b": INT8, "c": FLOAT, "d": INT8}
    assert measured == pytest.approx(0.75)
    alloc = {"a": FLOAT, "b": INT8, "c": FLOAT, "d": INT8}
    assert run(alloc, -0.05) == (pytest.approx(0.75), [])  # already within: nothing moves
    alloc = {"a": FLOAT, "b": FLOAT, "c": FLOAT, "d": FLOAT}  # predicted 1.0, always measured 0.3 over
    measured, moved = run(alloc, 0.3)
    assert moved == ["d", "a", "b", "c"] and measured == pytest.approx(0.9)  # all it can, still over
    alloc = {"a": FLOAT, "b": FLOAT, "c": FLOAT, "d": INT8}
    measured, moved = tighten(plan, alloc, 0.87, lambda: 0.9, converted.append)  # noise that never clears
    assert moved == ["a"]  # one move predicts 10 ms saved, past twice the 3 ms overshoot: stop there


@pytest.mark.usefixtures("one_thread")
def test_latency_budget_out_of_reach_or_outside_0_1_is_a_config_error() -> None:
    batches = [torch.randn(64, 256)]
    with pytest.raises(ConfigError, match="out of reach"):
        ts.compress(_mlp(), Recipe.single(MixedPrecisionConfig(latency_budget=0.01)), ts.Context(calib_data=batches))
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="latency_budget"):
            MixedPrecisionConfig(latency_budget=bad)
