from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from torchslim.measure.params import count_params


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight


class _Int8Linear(nn.Module):
    """A Linear whose weight became an int8 buffer with per-row float scales."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach()
        scale = w.abs().amax(dim=1, keepdim=True) / 127
        self.register_buffer("qweight", torch.round(w / scale).to(torch.int8))
        self.register_buffer("scale", scale)  # float buffer: metadata, not weights
        self.register_buffer("mask", torch.ones_like(w, dtype=torch.bool))
        self.bias = nn.Parameter(linear.bias.detach().clone())


class _Mask(nn.Module):
    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


def test_tied_weights_count_once() -> None:
    model = _Tied()
    total, nonzero = count_params(model)
    assert total == 50 * 16 == nonzero
    assert total == sum(p.numel() for p in model.parameters())


def test_nonzero_drops_by_the_zeroed_entries() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
    total, nonzero = count_params(model)
    assert total == nonzero == 32 * 16 + 16 + 16 * 4 + 4
    with torch.no_grad():
        model[0].weight[:, :8] = 0  # 16 * 8 entries
        model[2].bias.zero_()
    assert count_params(model) == (total, total - 16 * 8 - 4)


def test_int8_weight_buffers_count_like_the_float_weights() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 12), nn.ReLU(), nn.Linear(12, 3))
    before = count_params(model)
    model[0] = _Int8Linear(model[0])
    model[2] = _Int8Linear(model[2])
    assert count_params(model)[0] == before[0]
    assert sum(p.numel() for p in model.parameters()) < before[0]  # the rule matters


def test_masked_weights_count_nonzeros_through_the_mask() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(8, 8, bias=False)
    mask = torch.zeros(8, 8)
    mask[:, :3] = 1
    parametrize.register_parametrization(layer, "weight", _Mask(mask))
    assert count_params(layer) == (64, 24)
