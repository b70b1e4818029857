"""A tiny MobileNetV2-like network for the static int8 tests: a ReLU stem, two inverted residual
blocks (the first one's sum feeds the second), average pooling and a linear head."""

from __future__ import annotations

import torch
from torch import nn

# QLinearAdd's formula is that of ONNX Runtime's AVX2 kernel; other CPUs round some ties differently
AVX2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


class Inverted(nn.Module):
    """MobileNetV2's inverted residual: 1x1 expand + ReLU6, 3x3 depthwise + ReLU6, 1x1 project, + x."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(width, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
                                       nn.BatchNorm2d(hidden), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(hidden, width, 1, bias=False), nn.BatchNorm2d(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.depthwise(self.expand(x)))


class TinyMobileNet(nn.Module):
    """Stem (ReLU), two residual blocks (depthwise widths 16, a ConvSym kernel, and 24, the generic
    one), global average pooling and a linear head with float logits."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(Inverted(8, 16), Inverted(8, 24))
        self.head = nn.Linear(8, 5)
        trained_batchnorms(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(nn.functional.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


def trained_batchnorms(model: nn.Module) -> None:
    """Give every BatchNorm2d non-trivial statistics and affine terms, as after training."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
