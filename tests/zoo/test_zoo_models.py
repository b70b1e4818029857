"""Zoo architectures: shapes, where the parameters sit, the residual path, the registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchslim.errors import ModelError
from torchslim.zoo.models import MLP, MODELS, FashionCNN, ResidualBlock, build_model


def _share_in_linear(model: nn.Module) -> float:
    linear = sum(p.numel() for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters())
    return linear / sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("size", "batch"), [(28, 4), (8, 2)])
def test_fashion_cnn_forward_shape(size: int, batch: int) -> None:
    model = FashionCNN(image_size=size).eval()
    out = model(torch.randn(batch, 1, size, size))
    assert out.shape == (batch, 10) and torch.isfinite(out).all()


def test_fashion_cnn_keeps_most_weights_in_linear_layers() -> None:
    model = FashionCNN()
    assert _share_in_linear(model) >= 0.8  # int8 dynamic quantization only touches Linear
    last = model.get_submodule("classifier.3")
    assert isinstance(last, nn.Linear) and last.out_features == 10
    assert {name for name, _ in model.named_children()} == {"stem", "block", "down", "classifier"}
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_residual_block_adds_its_input() -> None:
    block = ResidualBlock(8).eval()
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        block.bn2.weight.zero_()
        block.bn2.bias.zero_()  # the conv branch now outputs zeros: only the shortcut is left
    assert torch.equal(block(x), torch.relu(x))


def test_fashion_cnn_rejects_sizes_the_pooling_cannot_halve_twice() -> None:
    with pytest.raises(ModelError, match="image_size must be divisible by 4, got 30"):
        FashionCNN(image_size=30)


def test_mlp_layers_and_dropout_option() -> None:
    plain = MLP()
    assert [m.out_features for m in plain.modules() if isinstance(m, nn.Linear)] == [1200, 1200, 10]
    assert not any(isinstance(m, nn.Dropout) for m in plain.modules())
    small = MLP(in_features=64, hidden=(32,), dropout=0.5, num_classes=3)
    assert sum(isinstance(m, nn.Dropout) for m in small.modules()) == 1
    assert small(torch.randn(5, 1, 8, 8)).shape == (5, 3)
    assert plain(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_registry_builds_and_reports_bad_names() -> None:
    assert set(MODELS) >= {"fashion_cnn", "mlp"}
    assert isinstance(build_model("fashion_cnn", num_classes=5), FashionCNN)
    assert build_model("mlp", hidden=(16,)).get_submodule("head").in_features == 16
    with pytest.raises(ModelError, match=r"unknown zoo model 'fashion_cn' \(did you mean 'fashion_cnn'\?\)"):
        build_model("fashion_cn")
    with pytest.raises(ModelError, match=r"zoo model 'mlp': bad arguments \['depth'\]"):
        build_model("mlp", depth=3)
