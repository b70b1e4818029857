import torch

from tiny_models import MLP
from torchslim.core import HookSet, surgery


def test_hookset_removes_every_hook_on_exit() -> None:
    model = MLP()
    seen: list[tuple[int, ...]] = []
    with HookSet() as hooks:
        hooks.forward(model.fc1, lambda m, args, out: seen.append(tuple(out.shape)))
        hooks.forward_pre(model.fc2, lambda m, args: None)
        assert len(hooks) == 2 and surgery.leftovers(model) == ["fc1", "fc2"]
        model(torch.randn(3, 16))
    assert seen == [(3, 32)]
    assert surgery.leftovers(model) == []


def test_frozen_restores_every_flag_it_changed() -> None:
    from torchslim.core.hooks import frozen

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)).train()
    model[1].eval()
    model[0].bias.requires_grad_(False)
    with frozen(model) as inside:
        assert inside is model and not any(m.training for m in model.modules())
        assert not any(p.requires_grad for p in model.parameters())
    assert model.training and model[0].training and not model[1].training
    assert model[0].weight.requires_grad and not model[0].bias.requires_grad
    with frozen(None) as nothing:
        assert nothing is None
