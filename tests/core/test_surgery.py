import pytest
import torch
from torch import nn

from tiny_models import MLP, TinyLM
from torchslim.core import surgery


def test_mask_holds_zeros_through_training_and_finalize_bakes_them() -> None:
    torch.manual_seed(0)
    model = MLP()
    mask = torch.rand_like(model.fc1.weight) > 0.5
    surgery.add_mask(model.fc1, "weight", mask)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 16)).sum().backward()
        opt.step()
    assert torch.all(model.fc1.weight[~mask] == 0)
    surgery.finalize(model)
    assert surgery.leftovers(model) == []
    assert isinstance(model.fc1.weight, nn.Parameter)
    assert torch.all(model.fc1.weight[~mask] == 0)
    assert torch.count_nonzero(model.fc1.weight) == torch.count_nonzero(mask)


def test_second_mask_combines_with_the_first() -> None:
    model = MLP()
    a = torch.zeros_like(model.fc1.weight, dtype=torch.bool)
    a[:, :8] = True
    b = torch.zeros_like(a)
    b[:16] = True
    surgery.add_mask(model.fc1, "weight", a)
    surgery.add_mask(model.fc1, "weight", b)
    kept = surgery.get_mask(model.fc1, "weight")
    assert kept is not None and torch.equal(kept, a & b)


def test_replace_modules_swaps_by_fqn_and_refuses_the_root() -> None:
    model = MLP()
    done = surgery.replace_modules(model, [("fc2", model.fc2)], lambda fqn, m: nn.Identity())
    assert done == ("fc2",) and isinstance(model.fc2, nn.Identity)
    assert surgery.replace_modules(model, [("fc1", model.fc1)], lambda fqn, m: None) == ()
    with pytest.raises(ValueError, match="root"):
        surgery.replace_modules(model, [("", model)], lambda fqn, m: nn.Identity())


def test_shared_parameters_finds_tied_embeddings() -> None:
    assert surgery.shared_parameters(TinyLM()) == [["embed.weight", "lm_head.weight"]]
