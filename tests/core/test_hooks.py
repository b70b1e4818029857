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
