"""distillation.inversion: BN statistics matched from noise, a data-free stage trains a student."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.distillation.inversion import InversionConfig, synthesize
from torchslim.errors import ConfigError, UnsupportedModuleError
from torchslim.recipes import Recipe, Stage, TrainSpec
from torchslim.zoo import digits


def _cnn(width: int = 8, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))


@pytest.fixture(scope="module")
def teacher() -> nn.Module:
    model = _cnn(16)
    spec = TrainSpec(epochs=4, batch_size=64, lr=1e-2)
    return ts.compress(model, Recipe(stages=(Stage(name="t", methods=(), train=spec),), measure=()),
                       ts.Context(train_data=digits("train"))).model.eval()


def _bn_gap(model: nn.Module, x: torch.Tensor) -> float:
    gaps = []
    def hook(m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        gaps.append(float((args[0].mean((0, 2, 3)) - m.running_mean).norm()))
    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return sum(gaps)


def test_inverted_inputs_match_the_teachers_statistics_and_classes(teacher: nn.Module) -> None:
    example = digits("test").tensors[0][:1]
    data = synthesize(teacher, example, InversionConfig(samples=40, batch_size=40, iterations=60), seed=0)
    x, y = data.tensors
    assert x.shape == (40, 1, 8, 8)
    noise = torch.randn_like(x)
    assert _bn_gap(teacher, x) < 0.5 * _bn_gap(teacher, noise)
    with torch.no_grad():
        assert float((teacher(x).argmax(1) == y).float().mean()) > 0.9


def test_a_data_free_stage_trains_a_student_with_no_real_images(teacher: nn.Module) -> None:
    test = digits("test")
    stage = Stage(name="df", methods=(InversionConfig(samples=512, batch_size=128, iterations=60),),
                  train=TrainSpec(epochs=20, batch_size=64, lr=5e-3))
    ctx = ts.Context(teacher=teacher, example_inputs=test.tensors[0][:1])  # no train_data at all
    student = ts.compress(_cnn(8, seed=1), Recipe(stages=(stage,), measure=()), ctx).model.eval()
    with torch.no_grad():
        agree = float((student(test.tensors[0]).argmax(1) == teacher(test.tensors[0]).argmax(1)).float().mean())
        untrained = _cnn(8, seed=1)(test.tensors[0]).argmax(1)
        chance = float((untrained == teacher(test.tensors[0]).argmax(1)).float().mean())
    assert agree > chance + 0.2, (agree, chance)


def test_a_teacher_without_batchnorm_is_refused() -> None:
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(UnsupportedModuleError, match="BatchNorm.*distillation.datafree"):
        synthesize(mlp, torch.randn(1, 1, 8, 8), InversionConfig(samples=4))


def test_input_range_keeps_inverted_inputs_valid_and_still_fits_the_classes(teacher: nn.Module) -> None:
    example = digits("test").tensors[0][:1]
    free = synthesize(teacher, example, InversionConfig(samples=40, batch_size=40, iterations=60), seed=0)
    assert float(free.tensors[0].min()) < -0.5 or float(free.tensors[0].max()) > 1.5  # unbounded drifts out
    cfg = InversionConfig(samples=40, batch_size=40, iterations=60, input_range=[-0.5, 1.5])  # type: ignore[arg-type]
    assert cfg.input_range == (-0.5, 1.5)
    x, y = synthesize(teacher, example, cfg, seed=0).tensors
    assert float(x.min()) >= -0.5 and float(x.max()) <= 1.5
    with torch.no_grad():  # narrower than the data's own range (-0.81 to 1.85), yet most fit their class
        assert float((teacher(x).argmax(1) == y).float().mean()) > 0.7


@pytest.mark.parametrize("bad", [[1.0, 0.0], [0.0], "0-1", [0.0, "1"]])
def test_a_malformed_input_range_is_named(bad: object) -> None:
    with pytest.raises(ConfigError, match="input_range must be \\[low, high\\]"):
        InversionConfig(input_range=bad)  # type: ignore[arg-type]
