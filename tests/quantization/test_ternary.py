"""quantization.ternary: TWN threshold and scale, identity STE, training, packed 2-bit layers reload exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.core.storage import serialized_size
from torchslim.errors import ConfigError
from torchslim.export import load, save
from torchslim.quantization import TernaryConv2d, TernaryLinear, TernaryQuantizationConfig
from torchslim.quantization.lowbit import ternarize, ternary_codes
from torchslim.quantization.ternary import TernaryQuantization
from torchslim.recipes import Recipe, TrainSpec
from torchslim.train.driver import fit


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 4))


def _data(n: int = 128) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean(dim=(1, 2)) > 0).long() + 2 * (x[:, 0, :, :4].mean(dim=(1, 2)) > 0).long()
    return torch.utils.data.TensorDataset(x, y)


def test_threshold_and_scale_on_a_hand_made_weight() -> None:
    w = torch.tensor([[1.0, -0.1, 0.2, -0.9], [0.0, 0.0, 0.0, 0.4]])
    # row 0: mean |w| = 0.55, delta = 0.385: keeps 1.0 and -0.9, alpha = 0.95
    # row 1: mean |w| = 0.1, delta = 0.07: keeps 0.4, alpha = 0.4
    signs, alpha = ternary_codes(w, 0.7, per_channel=True)
    assert signs.tolist() == [[1.0, 0.0, 0.0, -1.0], [0.0, 0.0, 0.0, 1.0]]
    torch.testing.assert_close(alpha, torch.tensor([0.95, 0.4]))
    # per tensor: mean |w| = 0.325, delta = 0.2275: keeps 1.0, -0.9, 0.4; alpha = 2.3 / 3
    signs, alpha = ternary_codes(w, 0.7, per_channel=False)
    assert signs.tolist() == [[1.0, 0.0, 0.0, -1.0], [0.0, 0.0, 0.0, 1.0]]
    torch.testing.assert_close(alpha, torch.full((2,), 2.3 / 3))
    torch.testing.assert_close(ternarize(w, 0.7, False), signs * (2.3 / 3))


def test_straight_through_gradient_reaches_every_float_weight() -> None:
    w = torch.randn(4, 2, 3, 3, requires_grad=True)
    g = torch.randn(4, 2, 3, 3)
    ternarize(w).backward(g)
    assert w.grad is not None and w.grad.shape == w.shape
    torch.testing.assert_close(w.grad, g, rtol=0, atol=0)


def test_training_lowers_the_loss_and_packed_model_computes_what_training_saw() -> None:
    history: list[float] = []
    model = _cnn()
    method = TernaryQuantization(TernaryQuantizationConfig(keep_first_last=False))
    ctx = ts.Context(train_data=_data(), seed=0)
    fit(model, TrainSpec(epochs=6, batch_size=16, lr=2e-2), [method], ctx, history=history)
    x = _data().tensors[0][:16]
    with torch.no_grad():
        trained_out = model.eval()(x)
    method.on_end(model, ctx)
    assert isinstance(model[0], TernaryConv2d) and isinstance(model[7], TernaryLinear)
    per_epoch = [sum(history[i:i + 8]) / 8 for i in range(0, len(history), 8)]
    assert per_epoch[-1] < 0.85 * per_epoch[0], per_epoch
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained_out, rtol=0, atol=0)
    values = model[5].signs().unique().tolist()
    assert set(values) == {-1.0, 0.0, 1.0}


def test_saved_file_is_about_16x_smaller_and_reloads_bit_exact(tmp_path: Path) -> None:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 1024), nn.Linear(1024, 512, bias=False), nn.Linear(512, 4))

    model = build()
    dense_layer = serialized_size(nn.Sequential(model[1]))
    x = torch.randn(64, 16)
    data = torch.utils.data.TensorDataset(x, torch.randint(0, 4, (64,)))
    recipe = Recipe.single(TernaryQuantizationConfig(per_channel=False), TrainSpec(steps=2, batch_size=16))
    result = ts.compress(model, recipe, ts.Context(train_data=data, seed=0))
    assert isinstance(result.model[1], TernaryLinear)
    assert dense_layer / serialized_size(nn.Sequential(result.model[1])) > 15
    assert len(result.model[1].scale.unique()) == 1  # per tensor: one scale
    save(result, tmp_path / "run")
    reloaded = load(tmp_path / "run", build)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), result.model(x), rtol=0, atol=0)


def test_bad_threshold_is_refused() -> None:
    with pytest.raises(ConfigError, match="threshold_factor must be a number in"):
        TernaryQuantizationConfig(threshold_factor=-0.1)
    with pytest.raises(ConfigError, match="per_channel must be true or false"):
        TernaryQuantizationConfig(per_channel="no")  # type: ignore[arg-type]
