import logging

import pytest
import torch
from torch import nn

from tiny_models import MLP, ResConcatCNN
from torchslim.core import Context, surgery
from torchslim.errors import ConfigError, DataError, UnsupportedModuleError
from torchslim.pruning.nm import NMPruningConfig, apply, nm_mask, parse_pattern


def _groups(weight: torch.Tensor, m: int) -> torch.Tensor:
    """(out, in, *k) -> rows of m consecutive input weights at each (out, *k)."""
    return weight.movedim(1, -1).reshape(-1, m)


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4", "3:4"])
def test_mask_keeps_exactly_the_n_largest_of_every_group(pattern: str) -> None:
    n, m = parse_pattern(pattern)
    scores = torch.rand(16, 32, generator=torch.Generator().manual_seed(0))
    mask = nm_mask(scores, n, m)
    kept, groups = _groups(mask, m), _groups(scores, m)
    assert (kept.sum(dim=1) == n).all()
    smallest_kept = torch.where(kept, groups, torch.inf).min(dim=1).values
    largest_dropped = torch.where(kept, -torch.inf, groups).max(dim=1).values
    assert (smallest_kept > largest_dropped).all()


def test_ties_still_keep_exactly_n() -> None:
    mask = nm_mask(torch.ones(3, 8), 2, 4)
    assert mask.tolist() == [[True, True, False, False] * 2] * 3


def test_apply_gives_the_exact_pattern_on_linear_layers() -> None:
    torch.manual_seed(0)
    model = MLP()
    out = apply(model, NMPruningConfig(pattern="2:4"), Context())
    assert set(out.touched) == {"fc1", "fc2"}
    assert out.stats["sparsity"] == 0.5 and out.layers["fc1"]["sparsity"] == 0.5
    surgery.finalize(model)
    for layer in (model.fc1, model.fc2):
        nonzero = (_groups(layer.weight, 4) != 0).sum(dim=1)
        assert (nonzero == 2).all()  # random normal weights are never exactly 0
        assert torch.count_nonzero(layer.bias) == layer.bias.numel()


def test_conv_groups_run_along_input_channels_at_each_kernel_position() -> None:
    conv = nn.Conv2d(8, 3, 3, bias=False)
    with torch.no_grad():  # |w| grows with the input channel inside each group of 4 -> keep 2, 3 and 6, 7
        conv.weight.copy_(torch.tensor([1.0, 2, 3, 4, 1, 2, 3, 4]).view(1, 8, 1, 1).expand(3, 8, 3, 3))
        conv.weight.mul_(torch.randn(3, 1, 3, 3).sign())  # signs must not matter
    model = nn.Sequential(conv)
    apply(model, NMPruningConfig(pattern="2:4"), Context())
    mask = surgery.get_mask(conv, "weight")
    assert mask is not None
    expected = torch.tensor([False, False, True, True] * 2).view(1, 8, 1, 1).expand(3, 8, 3, 3)
    assert torch.equal(mask, expected)


def test_conv_with_random_weights_has_the_pattern_in_krsc_layout() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 4, 3)
    model = nn.Sequential(conv)
    apply(model, NMPruningConfig(pattern="2:4"), Context())
    surgery.finalize(model)
    nonzero = (conv.weight.permute(0, 2, 3, 1).reshape(-1, 4) != 0).sum(dim=1)  # (out, kh, kw, in)
    assert (nonzero == 2).all()


def test_layers_of_indivisible_width_are_skipped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = ResConcatCNN()  # stem.0 has 3 input channels
    with caplog.at_level(logging.WARNING, logger="torchslim.pruning.nm"):
        out = apply(model, NMPruningConfig(pattern="2:4"), Context())
    assert "stem.0" in caplog.text and "3" in caplog.text
    assert set(out.touched) == {"res.0", "side", "head"}
    assert out.stats["skipped_layers"] == 1.0
    assert surgery.get_mask(model.stem[0], "weight") is None


def test_no_divisible_layer_is_an_error_naming_the_layers() -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(10, 4))
    with pytest.raises(UnsupportedModuleError, match=r"divisible by 4.*0 \(6\), 1 \(10\)"):
        apply(model, NMPruningConfig(pattern="2:4"), Context())
    assert surgery.leftovers(model) == []


@pytest.mark.parametrize("pattern", ["4:4", "3:2", "0:4", "a:b", "2-4", "2:4:8", ""])
def test_bad_patterns_are_config_errors(pattern: str) -> None:
    with pytest.raises(ConfigError, match="0 < N < M"):
        NMPruningConfig(pattern=pattern)


def _scaled_inputs(scales: list[float], n: int = 64) -> list[torch.Tensor]:
    x = torch.randn(n, len(scales), generator=torch.Generator().manual_seed(0))
    return [x * torch.tensor(scales)]


def test_saliency_prefers_inputs_with_large_activation_norms() -> None:
    layer = nn.Linear(8, 2)
    with torch.no_grad():
        layer.weight.fill_(1.0)  # equal |w|: magnitude alone would keep the first two of each group
    model = nn.Sequential(layer).train()
    ctx = Context(calib_data=_scaled_inputs([1, 9, 2, 8, 7, 1, 1, 6]))
    apply(model, NMPruningConfig(pattern="2:4", importance="saliency"), ctx)
    mask = surgery.get_mask(layer, "weight")
    assert mask is not None
    assert mask[0].tolist() == [False, True, False, True, True, False, False, True]
    assert model.training and not layer._forward_hooks  # mode restored, hooks gone


def test_saliency_on_a_grouped_conv_uses_each_groups_channels() -> None:
    conv = nn.Conv2d(8, 4, 1, groups=2, bias=False)  # weight (4, 4, 1, 1)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    scales = torch.tensor([1.0, 2, 3, 4, 4, 3, 2, 1]).view(1, 8, 1, 1)
    x = torch.randn(16, 8, 5, 5, generator=torch.Generator().manual_seed(0)).abs() + 1.0
    apply(nn.Sequential(conv), NMPruningConfig(importance="saliency"), Context(calib_data=[x * scales]))
    mask = surgery.get_mask(conv, "weight")
    assert mask is not None
    assert mask.flatten(1).tolist() == [[False, False, True, True]] * 2 + [[True, True, False, False]] * 2


def test_saliency_without_calibration_data_is_a_data_error() -> None:
    with pytest.raises(DataError, match="calib_data"):
        apply(MLP(), NMPruningConfig(importance="saliency"), Context())
