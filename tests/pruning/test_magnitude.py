import pytest
import torch

from tiny_models import ResConcatCNN
from torchslim.core import Context, surgery
from torchslim.pruning.magnitude import MagnitudePruningConfig, apply, magnitude_mask


def test_mask_keeps_requested_share_even_with_ties() -> None:
    weight = torch.randn(64, 64)
    kept = magnitude_mask(weight, sparsity=0.75).float().mean().item()
    assert kept == pytest.approx(0.25, abs=1 / weight.numel())
    ties = torch.ones(10, 10)
    assert int(magnitude_mask(ties, 0.3).sum()) == 70


def test_mask_keeps_the_largest_magnitudes() -> None:
    weight = torch.tensor([[0.1, -5.0], [3.0, -0.2]])
    assert magnitude_mask(weight, 0.5).tolist() == [[False, True], [True, False]]


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_apply_reaches_the_sparsity_over_selected_layers(scope: str) -> None:
    torch.manual_seed(0)
    model = ResConcatCNN()
    out = apply(model, MagnitudePruningConfig(sparsity=0.6, scope=scope, ignore=("head",)), Context())
    assert out.stats["sparsity"] == pytest.approx(0.6, abs=0.01)
    assert set(out.touched) == {"stem.0", "res.0", "side"}
    surgery.finalize(model)
    zeros = sum(int((model.get_submodule(f).weight == 0).sum()) for f in out.touched)
    total = sum(model.get_submodule(f).weight.numel() for f in out.touched)
    assert zeros / total == pytest.approx(0.6, abs=0.01)
    assert torch.count_nonzero(model.head.weight) == model.head.weight.numel()


def test_global_scope_prunes_small_layers_harder() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    with torch.no_grad():
        model[0].weight.mul_(0.01)  # all small
    out = apply(model, MagnitudePruningConfig(sparsity=0.5, scope="global"), Context())
    assert out.layers["0"]["sparsity"] == 1.0 and out.layers["1"]["sparsity"] == 0.0
