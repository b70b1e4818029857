"""nas.autocompress: per-layer ratios under a FLOPs budget, never worse than uniform, reloads."""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

import torchslim as ts
from tiny_models import ResConcatCNN
from torchslim.errors import ConfigError, DataError, RecipeError
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


def _ctx(model: nn.Module, size: int = 8) -> ts.Context:
    x = torch.randn(16, 3, size, size, generator=torch.Generator().manual_seed(0))
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
    cfg = AutoCompressConfig(ratios=(0.0, 0.5), budget={"flops": 0.8}, trials=12, strategy="tpe", ignore=("head",))
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
        ts.apply(model, AutoCompressConfig(ratios=(0.0, 0.25), budget={"flops": 0.01}, trials=2), _ctx(model))
    with pytest.raises(DataError, match="eval_fn"):
        ts.apply(model, AutoCompressConfig(trials=1), ts.Context(example_inputs=torch.randn(1, 3, 8, 8)))
    with pytest.raises(ConfigError, match="budget.flops must be a share"):
        AutoCompressConfig(budget={"flops": 0.0})
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
    fields = {"ratios": (0.0, 0.5), "budget": {"flops": 0.7}, "trials": 4, "targets": (r"re:block\.\d$",)}
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
    cfg = AutoCompressConfig(ratios=(0.0, 0.25, 0.5, 0.75), budget={"flops": 0.5}, trials=10, strategy="random",
                             ignore=("head",))
    result = ts.apply(model, cfg, ctx)
    stats = result.record.outcomes[0].stats
    assert stats["feasible"] == stats["trials"] == 10  # a random pick rarely fits; each was moved into the budget
    assert stats["flops_share"] <= 0.5


class _Wide(nn.Module):
    """A conv feature extractor and a wide classifier holding most of the weights (like fashion_cnn)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 64, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(torch.relu(self.conv(x)).flatten(1))))


def test_bit_widths_under_a_size_budget_make_a_file_that_small(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _Wide().eval()
    ctx = _ctx(model)
    save(ts.compress(copy.deepcopy(model), Recipe(stages=()), ctx), tmp_path / "float")
    cfg = AutoCompressConfig(ratios=(0.0,), bits=(2, 4, 8), budget={"size": 0.15}, trials=10, strategy="tpe",
                             targets=("type:Conv2d", "type:Linear"),
                             quantize=({"method": "sharing.kmeans", "iterations": 5}, {"method": "sharing.huffman"}))
    result = ts.compress(model, Recipe.single(cfg), ctx)
    outcome = result.record.outcomes[0]
    assert outcome.stats["size_share"] <= 0.15
    assert outcome.stats["best_score"] >= outcome.stats["best_uniform_score"]
    assert {layer["bits"] for layer in outcome.layers.values()} <= {2.0, 4.0, 8.0}
    save(result, tmp_path / "run")
    weights = (tmp_path / "run" / "model.safetensors").stat().st_size
    assert weights <= 0.16 * (tmp_path / "float" / "model.safetensors").stat().st_size  # the file really shrank
    x = ctx.example_inputs
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "run", _Wide)(x), result.model(x), rtol=0, atol=0)


def test_pruning_and_bits_together_under_flops_and_size_budgets() -> None:
    torch.manual_seed(0)
    model = _Chain().eval()
    ctx = _ctx(model)
    cfg = AutoCompressConfig(ratios=(0.0, 0.5), bits=(4, 8), budget={"flops": 0.8, "size": 0.3}, trials=8,
                             targets=("type:Conv2d",), ignore=("head",))
    outcome = ts.apply(model, cfg, ctx).record.outcomes[0]
    assert outcome.stats["flops_share"] <= 0.8 and outcome.stats["size_share"] <= 0.3
    assert set(outcome.layers) == {"a", "b", "c"} and all("bits" in v and "ratio" in v for v in outcome.layers.values())
    assert outcome.stats["best_score"] >= outcome.stats["best_uniform_score"]


def test_a_latency_budget_is_measured() -> None:
    torch.manual_seed(0)
    model = _Chain().eval()
    ctx = _ctx(model, size=48)  # large enough that the convs, not the call overhead, take the time
    cfg = AutoCompressConfig(ratios=(0.0, 0.75), budget={"latency": 0.95}, trials=3, ignore=("head",))
    outcome = ts.apply(model, cfg, ctx).record.outcomes[0]
    assert outcome.stats["feasible"] >= 1  # a trial measured within 0.95 of the original's latency
    assert outcome.stats["latency_share"] > 0 and "flops_share" in outcome.stats


def test_bad_budgets_and_bit_settings_fail_clearly() -> None:
    with pytest.raises(ConfigError, match=r"budget must bound some of \['flops', 'latency', 'size'\]"):
        AutoCompressConfig(budget={"speed": 0.5})
    with pytest.raises(ConfigError, match="distinct widths in 1..16"):
        AutoCompressConfig(bits=(4, 4))
    with pytest.raises(RecipeError, match=r"quantize\[0\]: sharing.kmeans has no field 'bit'"):
        AutoCompressConfig(bits=(4,), quantize=({"method": "sharing.kmeans", "bit": 3},))
    with pytest.raises(RecipeError, match=r"quantize: .*unknown method 'sharing.kmean'"):
        AutoCompressConfig(bits=(4,), quantize=({"method": "sharing.kmean"},))
    model = _Wide().eval()
    with pytest.raises(ConfigError, match="smallest reached size"):
        ts.apply(model, AutoCompressConfig(ratios=(0.0,), bits=(8,), budget={"size": 0.05}, trials=1,
                                           targets=("type:Linear",)), _ctx(model))


class _Normed(nn.Module):
    """Conv-BatchNorm-ReLU blocks: cutting one conv's channels changes what the next BatchNorm sees."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(*[nn.Sequential(nn.Conv2d(c_in, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
                                    for c_in in (3, 16, 16)])
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(dim=(2, 3)))


def test_candidates_and_the_result_get_batchnorm_statistics_of_the_calibration_data(
        caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = _Normed().eval()
    ctx = _ctx(model)
    calib = ctx.calib_data[0] * 2 + 1  # type: ignore[index]  # statistics unlike the original's (0 and 1)
    ctx = dataclasses.replace(ctx, calib_data=[calib])
    cfg = AutoCompressConfig(ratios=(0.0, 0.5), budget={"flops": 0.7}, trials=4, targets=(r"re:body\.[01]\.0$",))
    result = ts.apply(copy.deepcopy(model), cfg, ctx)
    pruned = result.model
    assert result.record.outcomes[0].stats["bn_batches"] == 1
    with torch.no_grad():  # the last block's statistics are those of the calibration images through the pruned net
        hidden = pruned.body[2][0](copy.deepcopy(pruned.body[:2]).train()(calib))  # normalized by batch statistics
    torch.testing.assert_close(pruned.body[2][1].running_mean, hidden.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-5)
    assert not pruned.training and pruned.body[2][1].momentum == 0.1
    # the score the search recorded is that of the returned model: it was judged with these statistics
    assert result.record.outcomes[0].stats["best_score"] == pytest.approx(ctx.eval_fn(pruned)["fidelity"])  # type: ignore[misc]

    kept = ts.apply(copy.deepcopy(model), dataclasses.replace(cfg, bn_batches=0), ctx).model
    torch.testing.assert_close(kept.body[2][1].running_mean, model.body[2][1].running_mean)  # unpruned layer: as before
    with caplog.at_level(logging.WARNING, logger="torchslim.nas.autocompress"):
        ts.apply(copy.deepcopy(model), cfg, dataclasses.replace(ctx, calib_data=None))
    assert "original BatchNorm statistics" in caplog.text
    with pytest.raises(ConfigError, match="bn_batches must be >= 0"):
        AutoCompressConfig(bn_batches=-1)
