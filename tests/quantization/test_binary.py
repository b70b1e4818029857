"""quantization.binary: XNOR scales, clipped STE, training works, packed 1-bit layers reload exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.core.storage import serialized_size
from torchslim.errors import ConfigError, RecipeError, UnsupportedModuleError
from torchslim.export import load, save
from torchslim.quantization import BinaryConv2d, BinaryLinear, BinaryQuantizationConfig
from torchslim.quantization.binary import BinaryQuantization
from torchslim.quantization.lowbit import binarize, pack_bits, sign_ste, unpack_bits
from torchslim.recipes import Recipe, Stage, TrainSpec
from torchslim.train.driver import fit


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 4))


def _xnor_net() -> nn.Module:
    """No ReLU before a binarised layer: the sign of a ReLU output is always +1 (XNOR-Net: BN, sign, conv)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1, stride=2),
                         nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 4 * 4, 32), nn.BatchNorm1d(32),
                         nn.Linear(32, 4))


def _data(n: int = 128) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean(dim=(1, 2)) > 0).long() + 2 * (x[:, 0, :, :4].mean(dim=(1, 2)) > 0).long()
    return torch.utils.data.TensorDataset(x, y)


def _train(model: nn.Module, cfg: BinaryQuantizationConfig, epochs: int = 3) -> ts.Result:
    recipe = Recipe(stages=(Stage(name="bin", methods=(cfg,), train=TrainSpec(epochs=epochs, batch_size=16,
                                                                                lr=5e-3)),), measure=())
    return ts.compress(model, recipe, ts.Context(train_data=_data(), seed=0))


def test_scale_is_mean_abs_per_output_channel_on_a_hand_made_weight() -> None:
    w = torch.tensor([[0.5, -1.5, 0.0, 2.0], [-0.1, -0.2, 0.3, 0.0]])
    expected = torch.tensor([[1.0, -1.0, 1.0, 1.0], [-0.15, -0.15, 0.15, 0.15]])  # 0 counts as +1
    torch.testing.assert_close(binarize(w), expected, rtol=0, atol=1e-7)


def test_clipped_straight_through_gradient() -> None:
    x = torch.tensor([-2.0, -1.0, -0.3, 0.0, 0.7, 1.0, 1.5], requires_grad=True)
    sign_ste(x).backward(torch.arange(1.0, 8.0))
    assert x.grad is not None
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0]))
    w = torch.randn(6, 3, 3, 3, requires_grad=True)
    binarize(w).sum().backward()
    assert w.grad is not None and w.grad.shape == w.shape
    # d/dW of alpha * sign(W) summed: sign(W) * sum(sign) / n (through alpha) + alpha * 1{|W| <= 1}
    s = torch.where(w >= 0, 1.0, -1.0).detach()
    n = 27
    alpha = w.detach().abs().reshape(6, -1).mean(1).view(6, 1, 1, 1)
    expected = s * s.reshape(6, -1).sum(1).view(6, 1, 1, 1) / n + alpha * (w.detach().abs() <= 1)
    torch.testing.assert_close(w.grad, expected)


@pytest.mark.parametrize("bits", [1, 2])
def test_bit_packing_round_trips_with_padding(bits: int) -> None:
    codes = torch.randint(0, 2**bits - (1 if bits == 2 else 0), (5, 37), generator=torch.Generator().manual_seed(0))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, -(-37 * bits // 8))
    assert torch.equal(unpack_bits(packed, bits, 37), codes.int())


@pytest.mark.parametrize("activations", [False, True])
def test_training_lowers_the_loss_and_packed_model_computes_what_training_saw(activations: bool) -> None:
    history: list[float] = []
    model = _xnor_net()
    method = BinaryQuantization(BinaryQuantizationConfig(activations=activations, keep_first_last=False))
    ctx = ts.Context(train_data=_data(), seed=0)
    fit(model, TrainSpec(epochs=6, batch_size=16, lr=2e-2), [method], ctx, history=history)
    x = _data().tensors[0][:16]
    with torch.no_grad():
        trained_out = model.eval()(x)
    outcome = method.on_end(model, ctx)
    assert isinstance(model[0], BinaryConv2d) and isinstance(model[7], BinaryLinear)
    assert model[0].activations is activations and outcome.stats["layers"] == 4
    per_epoch = [sum(history[i:i + 8]) / 8 for i in range(0, len(history), 8)]
    assert per_epoch[-1] < 0.85 * per_epoch[0], per_epoch
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained_out, rtol=0, atol=0)
        assert set(model[5].signs().unique().tolist()) <= {-1.0, 1.0}


def test_first_and_last_layers_stay_float_by_default() -> None:
    result = _train(_cnn(), BinaryQuantizationConfig(), epochs=1)
    kinds = [type(m).__name__ for m in result.model]
    assert kinds[0] == "Conv2d" and kinds[-1] == "Linear"
    assert kinds[2] == "BinaryConv2d" and kinds[5] == "BinaryLinear"


def test_saved_file_is_about_32x_smaller_and_reloads_bit_exact(tmp_path: Path) -> None:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 1024), nn.Linear(1024, 512, bias=False), nn.Linear(512, 4))

    model = build()
    dense_layer = serialized_size(nn.Sequential(model[1]))
    x = torch.randn(64, 16)
    data = torch.utils.data.TensorDataset(x, torch.randint(0, 4, (64,)))
    recipe = Recipe.single(BinaryQuantizationConfig(), TrainSpec(steps=2, batch_size=16))
    result = ts.compress(model, recipe, ts.Context(train_data=data, seed=0))
    assert isinstance(result.model[1], BinaryLinear) and type(result.model[0]) is nn.Linear
    packed_layer = serialized_size(nn.Sequential(result.model[1]))
    assert dense_layer / packed_layer > 30, (dense_layer, packed_layer)  # 1 bit + a float scale per row
    save(result, tmp_path / "run")
    whole = (tmp_path / "run" / "model.safetensors").stat().st_size
    assert whole < serialized_size(build()) - 0.95 * dense_layer
    reloaded = load(tmp_path / "run", build)
    assert isinstance(reloaded[1], BinaryLinear)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), result.model(x), rtol=0, atol=0)


def test_bad_config_and_no_layer_left_are_errors() -> None:
    with pytest.raises(ConfigError, match="activations must be true or false"):
        BinaryQuantizationConfig(activations="yes")  # type: ignore[arg-type]
    with pytest.raises(RecipeError, match="no field"):
        ts.load_recipe("stages: [{name: s, train: {}, methods: [{method: quantization.binary, bits: 2}]}]")
    two_layers = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(UnsupportedModuleError, match="keep_first_last"):
        _train(two_layers, BinaryQuantizationConfig(), epochs=1)
