"""nas.autocompress: per-layer ratios under a FLOPs budget, never worse than uniform, reloads."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import torchslim as ts
from tiny_models import ResConcatCNN
from torchslim.errors import ConfigError, DataError
from torchslim.export import load, save
from torchslim.measure.flops import count_flops
from torchslim.nas.autocompress import AutoCompressConfig, compress_layers
from torchslim.recipes import Recipe


class _Chain(nn.Module):
    """Layers of very different importance: some cuts cost little, others a lot."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.c = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 4)
        with torch.no_grad():
            self.b.weight[8:] *= 1e-3  # half of b's channels barely matter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x))))))
        return self.head(h.mean(dim=(2, 3)))


def _ctx(model: nn.Module) -> ts.Context:
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(x)

    def fidelity(m: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            return {"fidelity": -float((m(x) - reference).pow(2).mean())}

    return ts.Context(example_inputs=x[:2], calib_data=[x], eval_fn=fidelity, seed=0)


def test_search_meets_the_budget_and_beats_uniform_ratios(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _Chain().eval()
    ctx = _ctx(model)
    base = count_flops(model, ctx.example_inputs)
    cfg = AutoCompressConfig(ratios=(0.0, 0.5), flops_budget=0.8, trials=12, strategy="tpe", ignore=("head",))
    result = ts.compress(model, Recipe.single(cfg), ctx)
    stats = result.record.outcomes[0].stats
    assert count_flops(result.model, ctx.example_inputs) <= 0.8 * base
    assert stats["best_score"] >= stats["best_uniform_score"]
    assert stats["best_score"] > stats["best_uniform_score"]  # cutting only the unimportant layer wins
    assert result.record.outcomes[0].layers["b"]["ratio"] == 0.5
    save(result, tmp_path / "run")
    x = ctx.example_inputs
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "run", _Chain)(x), result.model(x), rtol=0, atol=0)


def test_unreachable_budget_and_missing_eval_fn_are_clear_errors() -> None:
    model = ResConcatCNN().eval()
    with pytest.raises(ConfigError, match="smallest reached"):
        ts.apply(model, AutoCompressConfig(ratios=(0.0, 0.25), flops_budget=0.01, trials=2), _ctx(model))
    with pytest.raises(DataError, match="eval_fn"):
        ts.apply(model, AutoCompressConfig(trials=1), ts.Context(example_inputs=torch.randn(1, 3, 8, 8)))
    with pytest.raises(ConfigError, match="flops_budget"):
        AutoCompressConfig(flops_budget=0.0)
    with pytest.raises(ConfigError, match="ratios"):
        AutoCompressConfig(ratios=(1.0,))


class _Inverted(nn.Module):
    """An inverted residual's hidden width: produced by the expansion and the depthwise conv."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                                   nn.ReLU())
        self.project = nn.Conv2d(16, 3, 1)
        self.head = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.project(self.block(x)).mean(dim=(2, 3)))


def test_group_by_gives_layers_that_produce_one_channel_group_one_ratio(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _Inverted().eval()
    ctx = _ctx(model)
    fields = {"ratios": (0.0, 0.5), "flops_budget": 0.7, "trials": 4, "targets": (r"re:block\.\d$",)}
    alone = copy.deepcopy(model)  # per-layer ratios: a ratio on one producer of the group cuts nothing
    compress_layers(alone, {"block.0": 0.5, "block.2": 0.0}, AutoCompressConfig(**fields), ctx)  # type: ignore[arg-type]
    assert alone.block[0].out_channels == 16
    result = ts.apply(model, AutoCompressConfig(**fields, group_by=r"^(block)\."), ctx)  # type: ignore[arg-type]
    assert result.model.block[0].out_channels == result.model.block[2].in_channels == 8
    assert result.record.outcomes[0].layers == {"block.0": {"ratio": 0.5}, "block.2": {"ratio": 0.5}}
    save(result, tmp_path / "run")
    x = ctx.example_inputs
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "run", _Inverted)(x), result.model(x), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="exactly one capture group"):
        AutoCompressConfig(group_by="block")
    with pytest.raises(ConfigError, match="not a regular expression"):
        AutoCompressConfig(group_by="(block")


def test_candidates_over_the_budget_are_repaired_into_it() -> None:
    torch.manual_seed(0)
    model = _Chain().eval()
    ctx = _ctx(model)
    cfg = AutoCompressConfig(ratios=(0.0, 0.25, 0.5, 0.75), flops_budget=0.5, trials=10, strategy="random",
                             ignore=("head",))
    result = ts.apply(model, cfg, ctx)
    stats = result.record.outcomes[0].stats
    assert stats["feasible"] == stats["trials"] == 10  # a random pick rarely fits; each was moved into the budget
    assert stats["flops_share"] <= 0.5
