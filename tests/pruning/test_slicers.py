"""pruning/structured/slicers.py: each layer type keeps exactly the requested channels."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchslim.errors import UnsupportedModuleError
from torchslim.pruning.structured import slicers

KEEP = [0, 2, 3, 5]


@pytest.mark.parametrize("layer, x, out_dim", [
    (nn.Linear(6, 8), torch.randn(3, 6), -1),
    (nn.Conv1d(6, 8, 3), torch.randn(2, 6, 9), 1),
    (nn.Conv2d(6, 8, 3), torch.randn(2, 6, 7, 7), 1),
    (nn.ConvTranspose2d(6, 8, 3), torch.randn(2, 6, 5, 5), 1),
])
def test_output_channels_match_the_kept_rows(layer: nn.Module, x: torch.Tensor, out_dim: int) -> None:
    full = layer(x)
    changed = slicers.keep(layer, 0, KEEP)
    assert slicers.size(layer, 0) == len(KEEP) and changed
    torch.testing.assert_close(layer(x), full.index_select(out_dim, torch.tensor(KEEP)))


@pytest.mark.parametrize("layer, x, in_dim", [
    (nn.Linear(6, 8), torch.randn(3, 6), -1),
    (nn.Conv2d(6, 8, 3), torch.randn(2, 6, 7, 7), 1),
    (nn.ConvTranspose2d(6, 8, 3), torch.randn(2, 6, 5, 5), 1),
])
def test_input_channels_equal_zeroed_inputs(layer: nn.Module, x: torch.Tensor, in_dim: int) -> None:
    dropped = [i for i in range(6) if i not in KEEP]
    zeroed = x.clone()
    zeroed.index_fill_(in_dim % x.dim(), torch.tensor(dropped), 0.0)
    full = layer(zeroed)
    slicers.keep(layer, 1, KEEP)
    torch.testing.assert_close(layer(x.index_select(in_dim % x.dim(), torch.tensor(KEEP))), full)
    assert slicers.size(layer, 1) == len(KEEP)


def test_norm_layers_keep_their_statistics() -> None:
    bn = nn.BatchNorm2d(6).eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 6, 3, 3)
    full = bn(x)
    slicers.keep(bn, 0, KEEP)
    assert bn.num_features == 4 and bn.running_mean.shape == (4,)
    torch.testing.assert_close(bn(x[:, KEEP]), full[:, KEEP])
    ln = nn.LayerNorm(6)
    slicers.keep(ln, 0, KEEP)
    assert ln.normalized_shape == (4,) and ln(torch.randn(2, 4)).shape == (2, 4)
    gn = nn.GroupNorm(2, 8)
    slicers.keep(gn, 0, [0, 1, 4, 5])
    assert gn.num_channels == 4 and gn(torch.randn(1, 4, 2, 2)).shape == (1, 4, 2, 2)


def test_embedding_prelu_and_parameter_types() -> None:
    emb = nn.Embedding(10, 6)
    full = emb(torch.tensor([1, 7]))
    slicers.keep(emb, 0, KEEP)
    assert emb.embedding_dim == 4
    torch.testing.assert_close(emb(torch.tensor([1, 7])), full[:, KEEP])
    prelu = nn.PReLU(6)
    slicers.keep(prelu, 0, KEEP)
    assert prelu.num_parameters == 4 and isinstance(prelu.weight, nn.Parameter)
    frozen = nn.Linear(6, 8).double().requires_grad_(False)
    slicers.keep(frozen, 0, KEEP)
    assert frozen.weight.dtype == torch.float64 and not frozen.weight.requires_grad


def test_grouped_conv_loses_whole_groups_and_updates_groups() -> None:
    conv = nn.Conv2d(8, 8, 3, groups=4)
    x = torch.randn(1, 8, 5, 5)
    kept = torch.tensor([2, 3, 6, 7])  # groups 1 and 3: their inputs and outputs
    full = conv(x).index_select(1, kept)
    before = {"groups": 4, "out_channels": 8, "in_channels": 8}
    conv.weight = slicers.cut(conv.weight, 0, kept)
    conv.bias = slicers.cut(conv.bias, 0, kept)
    slicers.sync(conv, before)
    assert (conv.groups, conv.in_channels, conv.out_channels) == (2, 4, 4)
    torch.testing.assert_close(conv(x.index_select(1, kept)), full)
    with pytest.raises(UnsupportedModuleError, match="grouped"):
        slicers.keep(nn.Conv2d(8, 8, 3, groups=4), 1, [0, 1])


def test_unknown_types_are_refused_and_roles_reported() -> None:
    with pytest.raises(UnsupportedModuleError, match="ReLU"):
        slicers.keep(nn.ReLU(), 0, [0])
    conv = nn.Conv2d(3, 4, 1)
    assert slicers.role(conv, "weight", 0) == "out" and slicers.role(conv, "weight", 1) == "in"
    assert slicers.role(nn.BatchNorm2d(4), "weight", 0) == "norm"
    assert slicers.role(nn.ReLU(), "weight", 0) == "param"
