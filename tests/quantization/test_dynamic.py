"""quantization/dynamic.py: config checks, which layers are converted, accuracy and real size."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from tiny_models import MLP, ResConcatCNN, TinyLM
from torchslim.core import Context, config_from_dict, list_methods
from torchslim.core.storage import serialized_size
from torchslim.errors import ConfigError, RecipeError
from torchslim.quantization.dynamic import DynamicQuantizationConfig, apply
from torchslim.quantization.modules import DynamicQuantLinear


class WideMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU())
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.body(x))
        return out


def test_registered_and_defaults_round_trip() -> None:
    assert "quantization.dynamic" in list_methods()
    cfg = DynamicQuantizationConfig()
    assert (cfg.weight_bits, cfg.activation_bits, cfg.per_channel) == (8, 8, True)
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("field", ["weight_bits", "activation_bits"])
def test_fewer_bits_point_to_weight_only(field: str) -> None:
    with pytest.raises(ConfigError, match=rf"{field}=4 .*8.*quantization\.weight_only"):
        DynamicQuantizationConfig(**{field: 4})  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [0, 9, 16, -8, 8.0, True])
def test_bits_outside_1_to_8_are_rejected(value: object) -> None:
    with pytest.raises(ConfigError, match=r"integer in 1\.\.8"):
        DynamicQuantizationConfig(weight_bits=value)  # type: ignore[arg-type]


def test_recipe_with_bad_bits_names_the_method() -> None:
    with pytest.raises(RecipeError, match="weight_bits=4"):
        config_from_dict({"method": "quantization.dynamic", "weight_bits": 4}, where="stages[0].methods[0]")


def test_apply_converts_every_linear_and_keeps_outputs_usable() -> None:
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(32, 16)
    with torch.no_grad():
        before = model(x)
    out = apply(model, DynamicQuantizationConfig(), Context())
    assert out.model is model
    assert out.touched == ("fc1", "fc2")
    assert out.structure == {"fc1": {}, "fc2": {}}
    assert out.stats == {"int8_layers": 2}
    assert out.layers == {"fc1": {"bits": 8}, "fc2": {"bits": 8}}
    assert all(isinstance(model.get_submodule(f), DynamicQuantLinear) for f in out.touched)
    assert not model.get_submodule("fc1").training, "the replaced layer keeps the eval mode"
    with torch.no_grad():
        after = model(x)
    assert after.shape == before.shape and torch.isfinite(after).all()
    assert float((after - before).norm() / before.norm()) < 0.02


def test_targets_and_ignore_choose_the_layers() -> None:
    model = WideMLP()
    out = apply(model, DynamicQuantizationConfig(ignore=("head",)), Context())
    assert out.touched == ("body.0", "body.2") and type(model.head) is nn.Linear
    model = WideMLP()
    out = apply(model, DynamicQuantizationConfig(targets=("re:body\\..*",), ignore=("body.2",)), Context())
    assert out.touched == ("body.0",) and type(model.body[2]) is nn.Linear


def test_second_run_skips_converted_layers() -> None:
    model = WideMLP()
    apply(model, DynamicQuantizationConfig(ignore=("head",)), Context())
    out = apply(model, DynamicQuantizationConfig(), Context())
    assert out.touched == ("head",)


def test_selected_modules_that_cannot_be_converted_are_listed(caplog: pytest.LogCaptureFixture) -> None:
    model = ResConcatCNN()
    with caplog.at_level(logging.WARNING, logger="torchslim.quantization.dynamic"):
        out = apply(model, DynamicQuantizationConfig(targets=("type:Conv2d", "type:Linear")), Context())
    assert out.touched == ("head",)
    message = caplog.text
    assert "stay float" in message and all(f in message for f in ("stem.0", "res.0", "side"))
    assert type(model.side) is nn.Conv2d


def test_attention_out_proj_and_tied_head_stay_float(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = TinyLM().eval()
    tokens = torch.randint(0, 50, (2, 6))
    with caplog.at_level(logging.WARNING, logger="torchslim.quantization.dynamic"):
        out = apply(model, DynamicQuantizationConfig(), Context())
    assert out.touched == ("ffn.0", "ffn.2")
    assert "attn.out_proj" in caplog.text and "lm_head" in caplog.text
    assert model.lm_head.weight is model.embed.weight
    with torch.no_grad():
        assert model(tokens).shape == (2, 6, 50)


def test_serialized_size_of_a_linear_heavy_model_drops_below_30_percent() -> None:
    model = WideMLP()
    fp32 = serialized_size(model)
    apply(model, DynamicQuantizationConfig(), Context())
    assert serialized_size(model) < 0.30 * fp32
