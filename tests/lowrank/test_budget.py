"""The ``flops`` budget of lowrank.svd, lowrank.drone and lowrank.tucker, and 1x1 convs in svd/drone."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.errors import ConfigError, DataError
from torchslim.export import load, save
from torchslim.lowrank import DroneConfig, LowRankConv2d, SVDConfig, TuckerConfig
from torchslim.lowrank._budget import Layer, allocate
from torchslim.lowrank.drone import drone_factors
from torchslim.lowrank.svd import svd_factors
from torchslim.measure.flops import count_flops

BUDGETS = (0.15, 0.25, 0.35, 0.5, 0.7, 0.9)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 80), nn.ReLU(), nn.Linear(80, 48)).eval()


def _convs(seed: int = 0) -> nn.Module:
    """Only Tucker-eligible convs, so the model's FLOPs are the selected layers' FLOPs."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=2, dilation=2), nn.ReLU(),
                         nn.Conv2d(32, 48, 3, padding="valid")).eval()


def _pointwise(seed: int = 0) -> nn.Module:
    """A 1x1 conv on 12x12 pixels, then pooling and a Linear: both factorisable by lowrank.svd."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(32, 32, 1, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, 32)).eval()


def _correlated(n: int = 256, dim: int = 64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g) @ torch.randn(8, dim, generator=g) + 0.01 * torch.randn(n, dim, generator=g)


def _run(model: nn.Module, cfg: SVDConfig | DroneConfig | TuckerConfig, x: torch.Tensor) -> ts.Result:
    return ts.apply(model, cfg, ts.Context(example_inputs=x, calib_data=[x]))


def _ranks(result: ts.Result, dense: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Each selected layer's ranks; a layer left dense has its full ranks."""
    layers = result.record.outcomes[0].layers
    return {f: tuple(int(layers[f][k]) for k in ("rank", "rank_in", "rank_out") if k in layers[f])
            if f in layers else full for f, full in dense.items()}


CASES = {
    "svd": (_mlp, SVDConfig, lambda: _correlated(32), {"0": (64,), "2": (80,), "4": (48,)}),
    "drone": (_mlp, DroneConfig, lambda: _correlated(32), {"0": (64,), "2": (80,), "4": (48,)}),
    "tucker": (_convs, TuckerConfig, lambda: torch.randn(2, 16, 15, 15),
               {"0": (16, 32), "2": (32, 32), "4": (32, 48)}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_budget_is_met_and_a_tighter_budget_never_gives_higher_ranks(case: str) -> None:
    build, config, inputs, full = CASES[case]
    x = inputs()
    dense = count_flops(build(), x)
    previous: dict[str, tuple[int, ...]] | None = None
    for flops in BUDGETS:
        result = _run(build(), config(flops=flops), x)
        measured = count_flops(result.model, x) / dense
        share = result.record.outcomes[0].stats["flops_share"]
        assert measured <= flops + 1e-9, (flops, measured)
        assert share == pytest.approx(measured, abs=1e-3)  # the allocator counts what the model runs
        assert measured > flops - 0.08, (flops, measured)  # and spends the budget
        ranks = _ranks(result, full)
        if previous is not None:
            assert all(a <= b for f in ranks for a, b in zip(previous[f], ranks[f])), (flops, previous, ranks)
        previous = ranks


def _spectral(values: torch.Tensor, seed: int) -> torch.Tensor:
    """A square weight with singular values ``values`` and random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(len(values), len(values), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(len(values), len(values), generator=g, dtype=torch.float64))
    return ((u * values) @ v.T).float()


def test_the_steep_spectrum_gets_a_low_rank_and_the_flat_one_the_rest_of_the_budget() -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)).eval()
    with torch.no_grad():
        model[0].weight.copy_(_spectral(0.5 ** torch.arange(64, dtype=torch.float64), 0))  # steep
        model[1].weight.copy_(_spectral(torch.ones(64, dtype=torch.float64), 1))  # flat
    x = torch.randn(4, 64)
    result = _run(model, SVDConfig(flops=0.4), x)
    ranks = {f: v["rank"] for f, v in result.record.outcomes[0].layers.items()}
    # 0.4 of 2 * 64 * 64 multiply-adds per row buys 25 components of 128 each. The steep
    # layer's k-th component keeps 0.75 * 0.25^k of its energy: the 4th (0.0117) is worth
    # less than each of the flat layer's (1/64 = 0.0156), so it stops at rank 3.
    assert ranks == {"0": 3, "1": 22}, ranks
    kept = (1 - 0.25 ** 3) + 22 / 64  # retained energy shares summed over both layers
    assert kept > (1 - 0.25 ** 12) + 13 / 64 and kept > (1 - 0.25 ** 13) + 12 / 64  # vs an even split


def test_a_layer_that_runs_on_more_positions_costs_more_and_gets_a_lower_rank() -> None:
    model = _pointwise()
    with torch.no_grad():  # the same weight in both: only their cost differs
        model[4].weight.copy_(model[0].weight[:, :, 0, 0])
    x = torch.randn(2, 32, 24, 24)  # the 1x1 conv runs on 2 * 12 * 12 positions, the Linear on 2
    result = _run(model, SVDConfig(flops=0.45, targets=("type:Conv2d", "type:Linear")), x)
    layers = result.record.outcomes[0].layers
    assert isinstance(result.model[0], LowRankConv2d)
    assert "4" not in layers  # the Linear costs nearly nothing: it stays dense (full energy)
    assert count_flops(result.model, x) <= 0.45 * count_flops(_pointwise(), x)


class _TwoInputs(nn.Module):
    """``a`` reads the first 64 features, ``b`` the other 64."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.a(x[:, :64]) + self.b(x[:, 64:])
        return out


def test_drone_ranks_come_from_the_calibration_data() -> None:
    x = torch.cat([_correlated(), torch.randn(256, 64)], 1)  # a's inputs span 8 directions, b's all 64
    drone = _run(_TwoInputs(), DroneConfig(flops=0.3), x).record.outcomes[0].layers
    plain = _run(_TwoInputs(), SVDConfig(flops=0.3), x).record.outcomes[0].layers
    assert drone["a"]["rank"] <= 8 < plain["a"]["rank"], (drone, plain)
    assert drone["b"]["rank"] > plain["b"]["rank"], (drone, plain)


def test_a_low_rank_1x1_conv_is_reproduced_exactly_by_svd_and_drone() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 1, stride=2)
    with torch.no_grad():
        conv.weight.copy_((torch.randn(24, 4) @ torch.randn(4, 16))[:, :, None, None])
    x = torch.randn(3, 16, 9, 9)
    rows = x[..., ::2, ::2].movedim(1, -1).reshape(-1, 16).double()
    weight = conv.weight[:, :, 0, 0]
    for first, second in (svd_factors(weight, 4), drone_factors(weight, rows.T @ rows / len(rows), 4, damping=0)):
        with torch.no_grad():
            torch.testing.assert_close(LowRankConv2d.from_factors(conv, first, second)(x), conv(x),
                                       atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", list(CASES) + ["svd-conv"])
def test_budgeted_models_reload_bit_exactly(case: str, tmp_path: Path) -> None:
    if case == "svd-conv":
        build, cfg, x = _pointwise, SVDConfig(flops=0.5, targets=("type:Conv2d",)), torch.randn(2, 32, 12, 12)
    else:
        build, config, inputs, _ = CASES[case]
        cfg, x = config(flops=0.4), inputs()
    result = _run(build(), cfg, x)
    assert result.record.outcomes[0].touched
    save(result, tmp_path / "run")
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "run", build)(x), result.model(x), rtol=0, atol=0)


def test_allocate_stops_on_the_same_path_for_every_budget() -> None:
    g = torch.Generator().manual_seed(0)
    layers = {}
    for i, (n, m) in enumerate([(30, 50), (64, 16), (40, 40)]):
        shares = torch.rand(min(n, m), generator=g, dtype=torch.float64).sort(descending=True).values
        layers[str(i)] = Layer(shares=(shares / shares.sum(),), dense=n * m * (i + 1),
                               cost=lambda r, n=n, m=m, k=i + 1: r[0] * (n + m) * k)
    last: dict[str, float] = {f: 0 for f in layers}
    for flops in [i / 40 for i in range(4, 40)]:
        ranks, share = allocate(layers, flops, "test")
        assert share <= flops
        now = {f: math.inf if r is None else r[0] for f, r in ranks.items()}
        assert all(now[f] >= last[f] for f in layers), (flops, last, now)
        last = now


def test_bad_budgets_are_reported() -> None:
    for config in (SVDConfig, DroneConfig, TuckerConfig):
        for flops in (0, 1, 1.5, -0.2):
            with pytest.raises(ConfigError, match=r"flops must be a share in \(0, 1\)"):
                config(flops=flops)
        with pytest.raises(ConfigError, match="either flops .* or energy"):
            config(flops=0.5, energy=0.9)
    with pytest.raises(ConfigError, match="below the smallest share .* expected flops >= 0.0"):
        _run(_mlp(), SVDConfig(flops=0.01), _correlated(8))
    with pytest.raises(DataError, match="calibration data"):
        ts.apply(_mlp(), SVDConfig(flops=0.5), ts.Context())


def test_layers_inside_factorised_layers_are_never_factorised_again() -> None:
    model, x = _convs(), torch.randn(2, 16, 15, 15)
    first = _run(model, TuckerConfig(flops=0.5, targets=("0",)), x)
    again = _run(first.model, SVDConfig(flops=0.5, targets=("type:Conv2d",)), x)  # 1x1 convs inside "0"
    assert not again.record.outcomes[0].touched
    twice = _run(_run(_mlp(), SVDConfig(rank=8), _correlated(8)).model, SVDConfig(rank=4), _correlated(8))
    assert not twice.record.outcomes[0].touched
