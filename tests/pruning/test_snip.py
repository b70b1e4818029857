import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tiny_models import MLP, ResConcatCNN
from torchslim.core import Context, surgery
from torchslim.errors import DataError
from torchslim.pruning.magnitude import MagnitudePruningConfig
from torchslim.pruning.magnitude import apply as magnitude_apply
from torchslim.pruning.snip import SnipPruningConfig, apply


def test_keeps_the_largest_connection_sensitivity_on_a_hand_made_example() -> None:
    # y = w . x and, without targets, loss = |y| so g = sign(y) x and |g w| = |x w| = [0.5, 3, 4, 1].
    # Magnitude would keep w[0], w[2]; input size would keep x[1], x[3]; SNIP keeps 1 and 2.
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[5.0, 1.0, 2.0, 0.1]]))
    model = nn.Sequential(layer)
    out = apply(model, SnipPruningConfig(sparsity=0.5), Context(calib_data=[torch.tensor([[0.1, 3.0, 2.0, 10.0]])]))
    mask = surgery.get_mask(layer, "weight")
    assert mask is not None and mask.tolist() == [[False, True, True, False]]
    assert out.stats["used_labels"] == 0.0


def test_matches_a_reference_gradient_of_the_cross_entropy() -> None:
    torch.manual_seed(0)
    model = MLP()
    x, y = torch.randn(32, 16), torch.randint(0, 10, (32,))
    ref = copy.deepcopy(model)
    F.cross_entropy(ref(x), y).backward()
    scores = torch.cat([(p.grad * p).abs().flatten() for p in (ref.fc1.weight, ref.fc2.weight)])
    expected_kept = scores > scores.kthvalue(int(0.7 * scores.numel())).values
    out = apply(model, SnipPruningConfig(sparsity=0.7), Context(train_data=[(x, y)]))
    kept = torch.cat([surgery.get_mask(m, "weight").flatten() for m in (model.fc1, model.fc2)])
    assert torch.equal(kept, expected_kept)
    assert out.stats == {"sparsity": pytest.approx(0.7, abs=1e-3), "used_labels": 1.0}


def test_leaves_no_grads_and_restores_mode_flags_and_buffers() -> None:
    torch.manual_seed(0)
    model = ResConcatCNN().train()
    model.side.weight.requires_grad_(False)  # a frozen layer stays frozen
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    data = [(torch.randn(8, 3, 12, 12), torch.randint(0, 10, (8,))) for _ in range(3)]
    apply(model, SnipPruningConfig(sparsity=0.5, batches=2), Context(train_data=data))
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert not model.side.parametrizations.weight.original.requires_grad
    assert model.head.parametrizations.weight.original.requires_grad
    for name, value in model.named_buffers():
        if name in buffers:  # BatchNorm statistics are untouched (eval-mode pass)
            assert torch.equal(value, buffers[name]), name


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_scopes_reach_the_requested_sparsity(scope: str) -> None:
    torch.manual_seed(0)
    model = MLP()
    data = [(torch.randn(16, 16), torch.randint(0, 10, (16,)))]
    out = apply(model, SnipPruningConfig(sparsity=0.6, scope=scope), Context(train_data=data))
    if scope == "global":  # exactly int(0.6 * all weights) zeros, spread unevenly
        assert out.stats["sparsity"] == int(0.6 * (512 + 320)) / (512 + 320)
        assert out.layers["fc1"]["sparsity"] != out.layers["fc2"]["sparsity"]
    else:
        assert out.layers["fc1"]["sparsity"] == int(0.6 * 512) / 512
        assert out.layers["fc2"]["sparsity"] == int(0.6 * 320) / 320


def test_already_pruned_weights_stay_pruned() -> None:
    torch.manual_seed(0)
    model = MLP()
    magnitude_apply(model, MagnitudePruningConfig(sparsity=0.5), Context())
    before = surgery.get_mask(model.fc1, "weight").clone()
    data = [(torch.randn(16, 16), torch.randint(0, 10, (16,)))]
    apply(model, SnipPruningConfig(sparsity=0.5, scope="layer"), Context(train_data=data))
    after = surgery.get_mask(model.fc1, "weight")
    assert torch.equal(after, before)  # masked weights score 0: the same half is dropped


def test_without_any_data_is_a_data_error() -> None:
    with pytest.raises(DataError, match="train_data or ctx.calib_data"):
        apply(MLP(), SnipPruningConfig(), Context())
