from __future__ import annotations

import pytest
import torch
from torch import nn

from torchslim.errors import DataError
from torchslim.measure.flops import count_flops


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 32)
        self.b = nn.Linear(16, 32)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(y)


def test_linear_flops_are_two_per_multiply_add() -> None:
    assert count_flops(nn.Linear(64, 32), torch.randn(8, 64)) == 2 * 8 * 64 * 32


def test_tuple_and_dict_inputs() -> None:
    model = _TwoInputs()
    x, y = torch.randn(4, 64), torch.randn(4, 16)
    expected = 2 * 4 * 64 * 32 + 2 * 4 * 16 * 32
    assert count_flops(model, (x, y)) == expected
    assert count_flops(model, {"x": x, "y": y}) == expected


def test_mode_is_restored_and_dropout_is_off() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.5)).train()
    model[1].eval()  # a frozen BatchNorm inside a training model must stay frozen
    stats = model[1].running_mean.clone()
    count_flops(model, torch.randn(4, 8))
    assert model.training and model[0].training and not model[1].training
    torch.testing.assert_close(model[1].running_mean, stats)
    model.eval()
    count_flops(model, torch.randn(4, 8))
    assert not any(m.training for m in model.modules())


def test_no_autograd_graph_is_built() -> None:
    seen = []
    model = nn.Linear(4, 4)
    model.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    count_flops(model, torch.randn(2, 4))
    assert seen == [False]


def test_bad_input_type_is_a_data_error() -> None:
    with pytest.raises(DataError, match="found str"):
        count_flops(nn.Linear(4, 4), "not a tensor")
