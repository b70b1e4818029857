"""pruning/structured/prune.py: the choice of channels, the cut, and its undo."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tiny_models import ResConcatCNN
from torchslim.errors import ConfigError
from torchslim.pruning.structured.graph import trace
from torchslim.pruning.structured.group import Group, Slice, build_groups
from torchslim.pruning.structured.prune import choose, cut_channels, removed_positions, verify


def _group(size: int, fixed: int = 0) -> Group:
    return Group(slices=(Slice("fc", "weight", 0, "out", tuple(range(size))),), size=size, fixed=fixed,
                 producers=("fc",), prunable=True, units=tuple(range(1, size + 1)))


def test_choose_removes_the_lowest_scores_in_the_requested_share() -> None:
    scores = torch.tensor([5.0, 0.1, 3.0, 0.2, 4.0, 0.3, 2.0, 1.0])
    assert choose([_group(8)], [scores], ratio=0.5) == [[1, 3, 5, 7]]
    assert choose([_group(8)], [scores], ratio=0.0) == [[]]
    assert choose([_group(8)], [scores], ratio=0.5, round_to=8) == [[]]  # 4 rounds up to 8
    assert choose([_group(8)], [scores], ratio=0.9, min_channels=3) == [[1, 3, 5, 6, 7]]
    assert choose([_group(6, fixed=2)], [scores[:6]], ratio=0.5) == [[1, 2, 3, 5]]  # 8 channels, 2 must stay


def test_choose_refuses_to_empty_a_layer() -> None:
    with pytest.raises(ConfigError, match="leaves 'fc' with 0 of its 2 channels"):
        choose([_group(2)], [torch.zeros(2)], ratio=0.9, min_channels=0)


def test_cut_and_undo_restore_every_tensor_and_attribute() -> None:
    model = ResConcatCNN().eval()
    x = torch.randn(2, 3, 8, 8)
    reference = copy.deepcopy(model.state_dict())
    graph = trace(model, x)
    groups = [g for g in build_groups(graph, model, {"stem.0", "res.0", "side"}) if g.prunable]
    removed = [[0, 3], [1]]
    positions = removed_positions(groups, removed)
    assert positions[("head", "weight")][1].tolist() == [0, 3, 9]  # concat offset: side starts at 8
    cut = cut_channels(model, groups, removed)
    assert model.stem[0].out_channels == 6 and model.head.in_features == 9
    assert cut.structure["stem.1"] == {} and "head" in cut.touched
    assert verify(model, graph, groups, removed, x) is None
    model(x)
    cut.undo()
    assert model.stem[0].out_channels == 8 and model.stem[1].num_features == 8
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference[key]), key
    assert isinstance(model.head.weight, nn.Parameter)
