from pathlib import Path

import pytest
import torch

import torchslim as ts
from interrupt import KillAt, Stop
from tiny_models import MLP
from torchslim.core import Context, Step, TrainedMethod, surgery
from torchslim.errors import ConfigError
from torchslim.pruning.gradual import GradualPruning, GradualPruningConfig, agp_sparsity, schedule_bounds
from torchslim.recipes import TrainSpec
from torchslim.train import fit


def _data(n: int = 256) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=g)
    return torch.utils.data.TensorDataset(x, x[:, :10].argmax(dim=1))


def test_cubic_schedule_values() -> None:
    kw = {"initial": 0.0, "final": 0.8, "t0": 10, "t_end": 110}
    assert agp_sparsity(5, **kw) == 0.0  # before the start nothing is pruned
    assert agp_sparsity(10, **kw) == 0.0
    assert agp_sparsity(35, **kw) == pytest.approx(0.8 - 0.8 * 0.75**3)  # 0.4625
    assert agp_sparsity(60, **kw) == pytest.approx(0.7)  # 0.8 * (1 - 0.5^3)
    assert agp_sparsity(110, **kw) == 0.8 and agp_sparsity(500, **kw) == 0.8
    assert agp_sparsity(60, initial=0.2, final=0.8, t0=10, t_end=110) == pytest.approx(0.8 - 0.6 / 8)


def test_schedule_bounds_are_fractions_of_the_total() -> None:
    assert schedule_bounds(GradualPruningConfig(start=0.1, end=0.8), 100) == (10, 80)
    assert schedule_bounds(GradualPruningConfig(start=0.0, end=0.8), 2) == (0, 2)
    assert schedule_bounds(GradualPruningConfig(start=0.1, end=0.1), 3) == (1, 1)  # nonzero -> >= 1 step
    assert schedule_bounds(GradualPruningConfig(start=0.0, end=0.0), 50) == (0, 0)


class _Probe(TrainedMethod):
    """Records the zero share of each layer's mask and its effective weight after every step."""

    def __init__(self) -> None:
        super().__init__(None)
        self.masks: dict[int, dict[str, torch.Tensor]] = {}

    def on_step(self, step: Step) -> None:
        t = step.index + 1
        self.masks[t] = {}
        for name in ("fc1", "fc2"):
            layer = step.model.get_submodule(name)
            mask = surgery.get_mask(layer, "weight").clone()
            assert torch.equal(layer.weight == 0, ~mask), f"masked weights must read as 0 at step {t}"
            self.masks[t][name] = mask


def test_training_follows_the_schedule_and_ends_at_the_final_sparsity() -> None:
    torch.manual_seed(0)
    model, probe = MLP(), _Probe()
    cfg = GradualPruningConfig(sparsity=0.75, start=0.2, end=0.8, frequency=3)  # 12 steps: t0=2, t_end=10
    method = GradualPruning(cfg)
    fit(model, TrainSpec(steps=12, batch_size=32, lr=1e-2), [method, probe], Context(train_data=_data()))
    expected, current = {}, 0.0
    for t in range(1, 13):
        if t in (2, 5, 8, 10):
            current = agp_sparsity(t, initial=0.0, final=0.75, t0=2, t_end=10)
        expected[t] = current
    assert 0.0 < expected[5] < expected[8] < 0.75 == expected[12]
    for t, masks in probe.masks.items():
        for name, mask in masks.items():
            assert int((~mask).sum()) == int(mask.numel() * expected[t]), (t, name)
    for t in range(2, 13):  # once pruned, a weight stays pruned
        for name in ("fc1", "fc2"):
            assert not (probe.masks[t][name] & ~probe.masks[t - 1][name]).any()
    out = method.on_end(model, Context())
    assert out.layers == {"fc1": {"sparsity": 0.75}, "fc2": {"sparsity": 0.75}}
    final_mask = probe.masks[12]["fc1"]
    surgery.finalize(model)
    assert torch.equal(model.fc1.weight != 0, final_mask)


def test_global_scope_reaches_the_exact_overall_count() -> None:
    torch.manual_seed(0)
    model = MLP()
    method = GradualPruning(GradualPruningConfig(sparsity=0.6, scope="global", end=0.5, frequency=2))
    fit(model, TrainSpec(steps=8, batch_size=32), [method], Context(train_data=_data()))
    out = method.on_end(model, Context())
    assert out.stats["sparsity"] == int(0.6 * (512 + 320)) / (512 + 320)


def test_without_a_total_the_end_prunes_to_the_final_sparsity() -> None:
    torch.manual_seed(0)
    model = MLP()
    method = GradualPruning(GradualPruningConfig(sparsity=0.5))
    method.on_start(model, Context())
    x = torch.randn(4, 16)
    method.on_step(Step(0, x, None, model(x), model))  # total unknown: no update
    assert int(surgery.get_mask(model.fc1, "weight").sum()) == 512
    out = method.on_end(model, Context())
    assert out.stats["sparsity"] == 0.5


def test_compress_bakes_the_masks_and_records_the_outcome() -> None:
    torch.manual_seed(0)
    cfg = GradualPruningConfig(sparsity=0.5, frequency=1)
    result = ts.apply(MLP(), cfg, Context(train_data=_data(64)), steps=4, batch_size=16)
    assert surgery.leftovers(result.model) == []
    assert int((result.model.fc1.weight == 0).sum()) == 256
    (row,) = result.record.outcomes
    assert row.method == "pruning.gradual" and row.stats["sparsity"] == 0.5


def test_resume_after_a_kill_is_bit_identical(tmp_path: Path) -> None:
    data, spec = _data(), TrainSpec(epochs=3, batch_size=32)  # 8 steps an epoch, 24 in all
    cfg = GradualPruningConfig(sparsity=0.8, end=0.8, frequency=3)  # updates at 0, 3, ..., 18, 19
    torch.manual_seed(0)
    full = MLP()
    fit(full, spec, [GradualPruning(cfg), KillAt(-1)], Context(train_data=data, seed=1),
        checkpoint_dir=tmp_path / "full")
    torch.manual_seed(0)
    with pytest.raises(Stop):  # killed in epoch 2, after the checkpoint of epoch 1
        fit(MLP(), spec, [GradualPruning(cfg), KillAt(11)], Context(train_data=data, seed=1),
            checkpoint_dir=tmp_path / "killed")
    torch.manual_seed(123)
    resumed = MLP()
    method = GradualPruning(cfg)
    fit(resumed, spec, [method, KillAt(-1)], Context(train_data=data, seed=1),
        checkpoint_dir=tmp_path / "killed")
    assert method.state_dict() == {"sparsity": 0.8, "last_update": 19}
    full_state, resumed_state = full.state_dict(), resumed.state_dict()
    assert full_state.keys() == resumed_state.keys()
    for key, value in full_state.items():
        torch.testing.assert_close(resumed_state[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("fields", [{"sparsity": 1.0}, {"initial_sparsity": 0.6, "sparsity": 0.5},
                                    {"start": 0.9, "end": 0.5}, {"end": 1.5}, {"frequency": 0}])
def test_bad_settings_are_config_errors(fields: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match="pruning.gradual"):
        GradualPruningConfig(**fields)
