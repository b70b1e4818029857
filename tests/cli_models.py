"""Model factories for `py:` specs in CLI tests (digits: 8x8 inputs, 10 classes)."""

from torch import nn


def small_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


class SlowMLP(nn.Module):
    """An MLP whose forward pauses briefly, so a test can kill a run mid-training."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x):  # type: ignore[no-untyped-def]
        import time

        if self.training:
            time.sleep(0.004)
        return self.net(x)


def slow_mlp() -> nn.Module:
    return SlowMLP()
