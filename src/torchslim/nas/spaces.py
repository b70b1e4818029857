"""The CNN search space as plain config, the architectures it holds, and the network they build.

A space lists the choices per stage (width multiplier, number of residual blocks, kernel size);
an ``CNNArch`` is one concrete pick; ``build_cnn(arch)`` is the network. The network's body is
``@rebuildable`` with the architecture as its constructor arguments, so a searched model is
saved as one structure op and rebuilt by ``ts.load`` without running any stored code.

Layout for a 3-stage arch on 28x28 inputs (Fashion-MNIST)::

    stem     conv 3x3 in->w0 + BN + ReLU, maxpool 2                 -> w0 x 14 x 14
    stage 0  d0 residual blocks (two conv k0 x k0 + BN, add, ReLU)  -> w0 x 14 x 14
    stage i  conv k_i stride 2 w_{i-1}->w_i + BN + ReLU, d_i blocks -> w_i x 7 x 7, w_i x 4 x 4
    head     global average pool, Linear w_last -> num_classes
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from torchslim.core.config import check, coerce_fields
from torchslim.core.structure import rebuildable

if TYPE_CHECKING:  # typing.Self is Python 3.11+; the package supports 3.10
    from typing import Self

__all__ = ["CNNArch", "CNNBody", "CNNSpace", "GeneSpace", "SearchableCNN", "build_cnn", "default_cnn",
           "digits_cnn"]


class GeneSpace:
    """What every search space offers the strategies: named genes, each with its choices."""

    def genes(self) -> dict[str, tuple[Any, ...]]:
        """Parameter name -> choices."""
        raise NotImplementedError

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], where: str = "space") -> Self:
        """Validate plain data (a recipe's ``space:`` mapping): unknown keys and wrong types fail."""
        return cls(**coerce_fields(cls, raw, where))

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, numbers, strings) for YAML and JSON."""
        assert dataclasses.is_dataclass(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def _check_choices(self, *fields: str) -> None:
        """Each of ``fields`` lists at least one choice, none twice."""
        for field in fields:
            values = getattr(self, field)
            check(len(values) > 0, f"space.{field}: expected at least one choice, found an empty list")
            check(len(set(values)) == len(values),
                  f"space.{field}: expected distinct choices, found {list(values)}")

    def sample(self, rng: random.Random) -> dict[str, Any]:
        """A uniformly random pick of every gene."""
        return {name: rng.choice(choices) for name, choices in self.genes().items()}

    def extreme(self, largest: bool) -> dict[str, Any]:
        """The pick with every gene at its largest (or smallest) choice."""
        pick = max if largest else min
        return {name: pick(choices) for name, choices in self.genes().items()}


@dataclasses.dataclass(frozen=True, kw_only=True)
class CNNSpace(GeneSpace):
    """Choices of the CNN search space; every stage draws from the same lists.

    Args:
        base_widths: Channels of each stage at width multiplier 1; its length is the number
            of stages.
        width_mults: Width multipliers, one drawn per stage.
        depths: Residual blocks per stage (0 keeps only the stage's downsampling conv).
        kernels: Kernel sizes (odd), one drawn per stage.
        in_channels: Image channels.
        num_classes: Output logits.
        image_size: Side of the square input images.
    """

    kind: Literal["cnn"] = "cnn"
    base_widths: tuple[int, ...] = (16, 32, 64)
    width_mults: tuple[float, ...] = (0.5, 0.75, 1.0)
    depths: tuple[int, ...] = (0, 1, 2)
    kernels: tuple[int, ...] = (3, 5)
    in_channels: int = 1
    num_classes: int = 10
    image_size: int = 28

    def __post_init__(self) -> None:
        self._check_choices("base_widths", "width_mults", "depths", "kernels")
        check(all(w >= 1 for w in self.base_widths), f"space.base_widths: expected widths >= 1, found "
              f"{list(self.base_widths)}")
        check(all(m > 0 for m in self.width_mults), f"space.width_mults: expected multipliers > 0, found "
              f"{list(self.width_mults)}")
        narrowest = min(round(w * min(self.width_mults)) for w in self.base_widths)
        check(narrowest >= 1, f"space.width_mults: {min(self.width_mults)} x base_widths "
              f"{list(self.base_widths)} leaves a stage with 0 channels; expected at least 1")
        check(all(d >= 0 for d in self.depths),
              f"space.depths: expected depths >= 0, found {list(self.depths)}")
        check(all(k >= 1 and k % 2 == 1 for k in self.kernels),
              f"space.kernels: expected odd kernel sizes >= 1 (same padding), found {list(self.kernels)}")
        check(self.in_channels >= 1, f"space.in_channels: expected >= 1, found {self.in_channels}")
        check(self.num_classes >= 1, f"space.num_classes: expected >= 1, found {self.num_classes}")
        stages = len(self.base_widths)
        check(self.image_size >= 2**stages, f"space.image_size: {self.image_size} is too small for "
              f"{stages} stages (base_widths has {stages} entries; each halves the image); expected "
              f">= {2**stages}")

    def genes(self) -> dict[str, tuple[Any, ...]]:
        """Parameter name -> choices: ``w<i>`` (multiplier), ``d<i>`` (depth), ``k<i>`` (kernel)."""
        out: dict[str, tuple[Any, ...]] = {}
        for i in range(len(self.base_widths)):
            out[f"w{i}"], out[f"d{i}"], out[f"k{i}"] = self.width_mults, self.depths, self.kernels
        return out

    def arch(self, params: Mapping[str, Any]) -> CNNArch:
        """The architecture of one pick of every gene (see ``genes``)."""
        stages = range(len(self.base_widths))
        return CNNArch(
            widths=tuple(max(1, round(b * params[f"w{i}"])) for i, b in zip(stages, self.base_widths)),
            depths=tuple(int(params[f"d{i}"]) for i in stages),
            kernels=tuple(int(params[f"k{i}"]) for i in stages),
            in_channels=self.in_channels, num_classes=self.num_classes)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CNNArch:
    """One architecture: channels, residual blocks and kernel size per stage."""

    widths: tuple[int, ...]
    depths: tuple[int, ...]
    kernels: tuple[int, ...]
    in_channels: int = 1
    num_classes: int = 10

    def to_dict(self) -> dict[str, Any]:
        """Plain data; ``CNNBody(**arch.to_dict())`` builds it."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm2d(cout)]


class ResBlock(nn.Module):
    """Two ``k x k`` conv + BN at constant width, added to the input, then ReLU."""

    def __init__(self, width: int, kernel: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(width, width, kernel), nn.ReLU(), *_conv_bn(width, width, kernel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


def stem(in_channels: int, width: int) -> nn.Sequential:
    """3x3 conv + BN + ReLU, then 2x2 max pooling."""
    return nn.Sequential(*_conv_bn(in_channels, width, 3), nn.ReLU(), nn.MaxPool2d(2))


def stage(cin: int, cout: int, depth: int, kernel: int, first: bool) -> nn.Sequential:
    """A downsampling conv (except in the first stage) then ``depth`` residual blocks."""
    layers: list[nn.Module] = [] if first else [*_conv_bn(cin, cout, kernel, stride=2), nn.ReLU()]
    return nn.Sequential(*layers, *(ResBlock(cout, kernel) for _ in range(depth)))


class Head(nn.Module):
    """Global average pooling, then a Linear classifier."""

    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(x.mean(dim=(2, 3)))
        return out


@rebuildable
class CNNBody(nn.Module):
    """The searched network (stem, stages, head); its constructor arguments are the architecture."""

    def __init__(self, widths: tuple[int, ...], depths: tuple[int, ...], kernels: tuple[int, ...],
                 in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        if not len(widths) == len(depths) == len(kernels) >= 1:
            raise ValueError(f"CNNBody: widths, depths and kernels need one entry per stage, found "
                             f"{list(widths)}, {list(depths)}, {list(kernels)}")
        self.arch = CNNArch(widths=tuple(widths), depths=tuple(depths), kernels=tuple(kernels),
                            in_channels=in_channels, num_classes=num_classes)
        self.stem = stem(in_channels, widths[0])
        self.stages = nn.Sequential(*(
            stage(widths[max(i - 1, 0)], widths[i], depths[i], kernels[i], first=i == 0)
            for i in range(len(widths))))
        self.head = Head(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.stages(self.stem(x)))
        return out

    def spec_kwargs(self) -> dict[str, Any]:
        """Constructor arguments for structure.json."""
        return self.arch.to_dict()


class SearchableCNN(nn.Module):
    """Root of a searchable model: ``nas.search`` swaps ``body`` for the architecture it found."""

    def __init__(self, arch: CNNArch) -> None:
        super().__init__()
        self.body = CNNBody(**arch.to_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.body(x)
        return out


def build_cnn(arch: CNNArch) -> SearchableCNN:
    """The network of ``arch`` (randomly initialised, in training mode)."""
    return SearchableCNN(arch)


def default_cnn() -> SearchableCNN:
    """The largest network of the default ``CNNSpace`` (a base model spec for recipes and the CLI:
    ``py:torchslim.nas.spaces:default_cnn``)."""
    space = CNNSpace()
    return build_cnn(space.arch(space.extreme(largest=True)))


def digits_cnn() -> SearchableCNN:
    """A small base network for 8x8 inputs (sklearn digits): ``py:torchslim.nas.spaces:digits_cnn``."""
    return build_cnn(CNNArch(widths=(8, 16), depths=(1, 1), kernels=(3, 3)))
