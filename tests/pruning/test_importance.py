"""pruning/structured/importance.py: every scorer ranks a visibly useless channel last."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchslim as ts
from tiny_models import MLP
from torchslim.errors import ConfigError
from torchslim.pruning.structured.graph import trace
from torchslim.pruning.structured.group import Group, build_groups
from torchslim.pruning.structured.importance import Scoring, channel_entropy, importance_names, score


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def _scores(model: nn.Module, name: str, x: torch.Tensor) -> tuple[Group, torch.Tensor]:
    graph = trace(model, x)
    groups = [g for g in build_groups(graph, model, {"conv", "fc1"}) if g.prunable]
    ctx = ts.Context(example_inputs=x, calib_data=[(x, torch.zeros(len(x), dtype=torch.long))] * 2)
    return groups[0], score(name, model, groups, Scoring(graph, ctx, batches=2))[0]


def test_registry_holds_the_six_scorers_and_rejects_others() -> None:
    assert set(importance_names()) >= {"l1", "l2", "bn_scale", "taylor", "entropy", "apoz"}
    with pytest.raises(ConfigError, match="unknown importance 'l0'"):
        score("l0", MLP(), [], Scoring(trace(MLP(), torch.randn(1, 16))))


def test_l1_adds_each_layers_share_scaled_to_mean_one() -> None:
    model = MLP()
    group, got = _scores(model, "l1", torch.randn(2, 16))
    rows = model.fc1.weight.abs().sum(1)
    cols = model.fc2.weight.abs().sum(0)
    torch.testing.assert_close(got, (rows / rows.mean() + cols / cols.mean()).detach())
    assert group.size == 32


@pytest.mark.parametrize("name", ["l1", "l2", "taylor", "bn_scale", "entropy", "apoz"])
def test_a_dead_channel_scores_lowest(name: str) -> None:
    torch.manual_seed(0)
    model = ConvBN().eval()
    with torch.no_grad():
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(0.1, 0.5)
        model.conv.weight[2] = 0.0  # channel 2 outputs a constant ...
        model.bn.weight[2] = 0.0
        model.bn.bias[2] = -1.0  # ... that ReLU turns into zeros
        model.head.weight[:, 2] = 0.0
    _, got = _scores(model, name, torch.randn(8, 3, 6, 6))
    assert got.shape == (6,) and int(got.argmin()) == 2, got


def test_bn_scale_follows_gamma() -> None:
    model = ConvBN().eval()
    with torch.no_grad():
        model.bn.weight.copy_(torch.tensor([0.3, -2.0, 0.1, 1.0, 0.5, -0.2]))
    _, got = _scores(model, "bn_scale", torch.randn(2, 3, 4, 4))
    assert got.argsort().tolist() == [2, 5, 0, 4, 3, 1]


def test_channel_entropy_is_zero_for_constants_and_log_bins_for_uniform() -> None:
    pooled = torch.stack([torch.full((64,), 3.0), torch.arange(64.0)], dim=1)  # (N=64, C=2)
    got = channel_entropy(pooled, bins=16)
    assert got[0] == 0.0
    torch.testing.assert_close(got[1], torch.log(torch.tensor(16.0)), atol=0.05, rtol=0)
