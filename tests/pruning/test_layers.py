"""pruning.layers: the least influential blocks go, the rest compute as before, reload exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import torchslim as ts
from tiny_llama import tiny_llama, token_batches
from torchslim.errors import ConfigError, UnsupportedModuleError
from torchslim.export import load, save
from torchslim.pruning import LayerPruningConfig
from torchslim.recipes import Recipe
from torchslim.zoo.models import ResidualBlock


class Stages(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.body = nn.Sequential(*(ResidualBlock(8) for _ in range(4)))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)).mean((2, 3)))


def test_a_block_that_does_nothing_is_removed_first_and_outputs_are_unchanged(tmp_path: Path) -> None:
    model = Stages().eval()
    with torch.no_grad():  # block 2 adds zero: relu(x + 0) == x for the non-negative input it gets
        model.body[2].bn2.weight.zero_()
        model.body[2].bn2.bias.zero_()
    x = torch.randn(4, 1, 8, 8)
    reference = model(x)
    result = ts.compress(model, Recipe.single(LayerPruningConfig(ratio=0.25)), ts.Context(calib_data=[x]))
    assert result.record.outcomes[0].touched == ["body.2"]
    assert len(result.model.body) == 3
    torch.testing.assert_close(result.model(x), reference, atol=1e-6, rtol=1e-5)
    save(result, tmp_path / "run")
    torch.testing.assert_close(load(tmp_path / "run", Stages)(x), result.model(x), rtol=0, atol=0)


def test_decoder_layers_are_dropped_and_renumbered(tmp_path: Path) -> None:
    build = lambda: tiny_llama(layers=4)  # noqa: E731
    model, batches = build(), token_batches(vocab=128)
    result = ts.compress(model, Recipe.single(LayerPruningConfig(ratio=0.5)), ts.Context(calib_data=batches))
    assert len(result.model.model.layers) == 2
    assert result.model.config.num_hidden_layers == 2
    assert [m.self_attn.layer_idx for m in result.model.model.layers] == [0, 1]
    scores = {f: v["influence"] for f, v in result.record.outcomes[0].layers.items()}
    kept = sorted(set(scores) - set(result.record.outcomes[0].touched))
    assert min(scores[f] for f in kept) >= max(scores[f] for f in result.record.outcomes[0].touched)
    save(result, tmp_path / "run")
    x = batches[0]
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "run", build)(x).logits, result.model(x).logits, rtol=0, atol=0)


def test_bad_input_is_reported() -> None:
    with pytest.raises(ConfigError, match="ratio must be in"):
        LayerPruningConfig(ratio=1.0)
    with pytest.raises(UnsupportedModuleError, match="no removable blocks"):
        ts.apply(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), LayerPruningConfig(),
                 ts.Context(calib_data=[torch.randn(2, 4)]))
