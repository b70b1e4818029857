"""quantization/dynamic.py: config checks, which layers are converted, accuracy and real size."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tiny_models import MLP, ResConcatCNN, TinyLM
from torchslim.core import Context, config_from_dict, list_methods
from torchslim.core.storage import serialized_size
from torchslim.errors import ConfigError, DataError, RecipeError
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
    assert out.stats == {"int8_layers": 2, "fused_activations": 0}  # no data to find activations on
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


def _outlier_batches(n: int = 2) -> list[torch.Tensor]:
    """Inputs whose channels 3 and 40 are 60x the others (the outliers of LayerNorm outputs)."""
    g = torch.Generator().manual_seed(0)
    gain = torch.ones(64)
    gain[[3, 40]] = 60.0
    return [torch.randn(128, 64, generator=g) * gain for _ in range(n)]


def test_smoothing_moves_outlier_channels_into_the_weights_and_cuts_the_error() -> None:
    torch.manual_seed(0)
    batches = _outlier_batches(3)
    reference = WideMLP().eval()
    errors = {}
    for smooth in (None, 0.7):
        model = WideMLP().eval()
        model.load_state_dict(reference.state_dict())
        out = apply(model, DynamicQuantizationConfig(smooth=smooth, batches=2), Context(calib_data=batches[:2]))
        with torch.no_grad():
            ref, got = reference(batches[2]), model(batches[2])
        errors[smooth] = float((got - ref).norm() / ref.norm())
    assert out.stats == {"int8_layers": 3, "smoothed_layers": 3, "fused_activations": 2}  # the two ReLUs
    first = model.get_submodule("body.0")
    assert isinstance(first, DynamicQuantLinear) and first.smoothed
    assert first.input_scale[[3, 40]].max() < first.input_scale.median() / 4, "outlier channels are scaled down"
    with torch.no_grad():  # the float product is unchanged: to_linear undoes the migration
        torch.testing.assert_close(first.to_linear().weight, reference.body[0].weight, rtol=0, atol=0.02)
    assert errors[0.7] < errors[None] * 0.7  # measured: 0.011 against 0.021


def test_smoothed_layers_rebuild_from_structure_json_and_reload_bit_exact(tmp_path: Path) -> None:
    import torchslim as ts
    from torchslim.export import load, save
    from torchslim.recipes import Recipe

    batches = _outlier_batches()

    def build() -> nn.Module:
        torch.manual_seed(0)
        return WideMLP().eval()

    result = ts.compress(build(), Recipe.single(DynamicQuantizationConfig(smooth=0.5)), Context(calib_data=batches))
    with torch.no_grad():
        out = result.model(batches[0])
    save(result, tmp_path / "run")
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "run", build)(batches[0]), out, rtol=0, atol=0)


def test_smoothing_needs_calibration_data_and_a_strength_in_0_1() -> None:
    with pytest.raises(DataError, match="calibration"):
        apply(WideMLP(), DynamicQuantizationConfig(smooth=0.5), Context())
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="smooth"):
            DynamicQuantizationConfig(smooth=bad)


def test_activation_scale_is_row_or_tensor() -> None:
    assert DynamicQuantizationConfig().activation_scale == "row"
    with pytest.raises(ConfigError, match="activation_scale"):
        DynamicQuantizationConfig(activation_scale="channel")


class ActBlock(nn.Module):
    """A Hugging Face style MLP: the activation is a module that ``forward`` calls on the Linear's output."""

    def __init__(self, act: nn.Module, residual: bool = False) -> None:
        super().__init__()
        self.up, self.act, self.down, self.residual = nn.Linear(32, 64), act, nn.Linear(64, 32), residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        y = self.act(h)
        out: torch.Tensor = self.down(y + h if self.residual else y)  # residual: the pre-activation is read again
        return out


def _act_block(act: nn.Module, residual: bool = False) -> ActBlock:
    torch.manual_seed(0)
    return ActBlock(act, residual).eval()


@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize(("act", "name"), [(nn.GELU(), "gelu"), (nn.GELU(approximate="tanh"), "gelu_tanh"),
                                           (nn.ReLU(), "relu"), (nn.ReLU(inplace=True), "relu")])
def test_the_activation_after_a_layer_moves_into_it_with_the_same_outputs(act: nn.Module, name: str,
                                                                         per_tensor: bool) -> None:
    scale = "tensor" if per_tensor else "row"
    x = torch.randn(16, 32)
    separate = apply(_act_block(act), DynamicQuantizationConfig(activation_scale=scale, fuse_activations=False),
                     Context(calib_data=[x])).model
    outcome = apply(_act_block(act), DynamicQuantizationConfig(activation_scale=scale), Context(calib_data=[x]))
    fused = outcome.model
    assert isinstance(fused, ActBlock) and isinstance(separate, ActBlock)
    assert outcome.stats["fused_activations"] == 1 and outcome.layers["up"]["activation"] == name
    assert isinstance(fused.act, nn.Identity) and "act" in outcome.structure
    assert isinstance(fused.up, DynamicQuantLinear) and fused.up.activation == name
    assert type(separate.act) is type(act) and isinstance(separate.up, DynamicQuantLinear)
    assert separate.up.activation == "none"
    x = torch.randn(8, 32)
    with torch.no_grad():
        if per_tensor:  # oneDNN applies the activation in its epilogue: the same codes, float rounding apart
            torch.testing.assert_close(fused(x), separate(x), rtol=1e-5, atol=1e-5)
        else:  # the same op then the same activation function
            assert torch.equal(fused(x), separate(x))


def _relu_never_negative() -> ActBlock:
    block = _act_block(nn.ReLU())
    with torch.no_grad():  # every output of `up` positive on the batch: ReLU acts as the identity there
        block.up.bias.fill_(100.0)
    return block


@pytest.mark.parametrize("block", [lambda: _act_block(nn.GELU(), residual=True), lambda: _act_block(nn.SiLU()),
                                   lambda: _act_block(nn.Dropout(0.1)), _relu_never_negative],
                         ids=["output-read-twice", "silu", "dropout", "relu-saw-no-negative"])
def test_an_activation_is_left_alone_when_fusing_would_change_the_model(block: Any) -> None:
    x = torch.randn(16, 32)
    outcome = apply(block(), DynamicQuantizationConfig(), Context(calib_data=[x]))
    model = outcome.model
    assert outcome.stats["fused_activations"] == 0
    assert isinstance(model.up, DynamicQuantLinear) and model.up.activation == "none"
    assert not isinstance(model.act, nn.Identity)


def test_activations_are_fused_from_example_inputs_and_not_without_any_input() -> None:
    without = apply(_act_block(nn.GELU()), DynamicQuantizationConfig(), Context())
    assert without.stats["fused_activations"] == 0 and isinstance(without.model.act, nn.GELU)
    example = apply(_act_block(nn.GELU()), DynamicQuantizationConfig(), Context(example_inputs=torch.randn(4, 32)))
    assert example.stats["fused_activations"] == 1 and isinstance(example.model.act, nn.Identity)
    sequential = apply(WideMLP().eval(), DynamicQuantizationConfig(), Context(calib_data=[torch.randn(8, 64)]))
    assert sequential.stats["fused_activations"] == 2  # both ReLUs of the Sequential body


def test_fused_activations_rebuild_from_structure_json_and_reload_bit_exact(tmp_path: Path) -> None:
    import torchslim as ts
    from torchslim.export import load, save
    from torchslim.recipes import Recipe

    x = torch.randn(16, 32)
    result = ts.compress(_act_block(nn.GELU()), Recipe.single(DynamicQuantizationConfig(activation_scale="tensor")),
                         Context(calib_data=[x]))
    with torch.no_grad():
        out = result.model(x)
    save(result, tmp_path / "run")
    loaded = load(tmp_path / "run", lambda: _act_block(nn.GELU()))
    assert isinstance(loaded.act, nn.Identity) and loaded.up.activation == "gelu"
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), out, rtol=0, atol=0)
