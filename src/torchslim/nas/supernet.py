"""One-shot weight sharing for the CNN space: one supernet trained once, subnets sliced from it.

The supernet is the largest network of the space. A subnet uses the first ``w`` channels of
each stage, the first ``d`` residual blocks and the centre ``k x k`` of each kernel, so every
architecture of the space reads its weights from the same tensors. Training follows the
sandwich rule with in-place distillation (Yu et al., BigNAS): each step trains the largest
subnet on the labels and the smallest plus ``sandwich`` random subnets on the largest's
soft predictions, all in one backward pass. BatchNorm uses batch statistics while the
supernet trains; a sliced subnet gets its own running statistics from a few calibration
batches before it is scored.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchslim.core import Context, check
from torchslim.core.batchnorm import recalibrate_batchnorm
from torchslim.core.context import take_batches
from torchslim.core.storage import load_state_dict_into, read_state_dict, save_state_dict
from torchslim.nas.spaces import CNNArch, CNNBody, CNNSpace, SearchableCNN, build_cnn
from torchslim.recipes.schema import TrainSpec
from torchslim.train import fit
from torchslim.train.driver import task_loss

__all__ = ["CNNSupernet", "OneShot", "SandwichOutput", "calibration", "load_or_train", "recalibrate",
           "subnet"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OneShot:
    """How ``nas.search`` trains and reads a weight-sharing supernet (CNN space only).

    Args:
        epochs: Supernet training epochs on ``ctx.train_data``.
        sandwich: Random subnets per step besides the largest and the smallest.
        finetune_epochs: Training epochs of the chosen subnet after the search (0: none).
        calib_batches: Batches of ``ctx.calib_data`` (else ``train_data``) that give each
            sliced subnet its BatchNorm statistics.
        path: Where the trained supernet is saved and, if it exists for the same space,
            loaded from (workers of one study share it); ``<workdir>/supernet.safetensors``
            when unset, not saved without a workdir.
    """

    epochs: int = 5
    sandwich: int = 2
    finetune_epochs: int = 1
    calib_batches: int = 8
    path: str | None = None

    def __post_init__(self) -> None:
        check(self.epochs >= 1, f"nas.search.one_shot.epochs: expected >= 1, found {self.epochs}")
        check(self.sandwich >= 0, f"nas.search.one_shot.sandwich: expected >= 0, found {self.sandwich}")
        check(self.finetune_epochs >= 0,
              f"nas.search.one_shot.finetune_epochs: expected >= 0, found {self.finetune_epochs}")
        check(self.calib_batches >= 1,
              f"nas.search.one_shot.calib_batches: expected >= 1, found {self.calib_batches}")

    def file(self, workdir: Path | None) -> Path | None:
        """The supernet's file: ``path``, else ``<workdir>/supernet.safetensors``, else None."""
        if self.path is not None:
            return Path(self.path)
        return workdir / "supernet.safetensors" if workdir is not None else None


@dataclasses.dataclass
class SandwichOutput:
    """A training step's outputs: the largest subnet's ``logits`` and the other subnets'."""

    logits: torch.Tensor
    subnets: list[torch.Tensor]


def _conv_bn(conv: nn.Module, bn: nn.Module, x: torch.Tensor, cout: int, k: int) -> torch.Tensor:
    """``conv`` then ``bn`` (batch statistics) on the first ``cout`` channels and the centre k x k."""
    assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
    weight = conv.weight[:cout, : x.shape[1]]
    cut = (weight.shape[-1] - k) // 2
    if cut:
        weight = weight[:, :, cut:cut + k, cut:cut + k]
    y = F.conv2d(x, weight, stride=conv.stride, padding=k // 2)
    return F.batch_norm(y, None, None, bn.weight[:cout], bn.bias[:cout], training=True, eps=bn.eps)


class CNNSupernet(nn.Module):
    """The largest network of ``space`` run as any of its architectures (see the module docstring)."""

    def __init__(self, space: CNNSpace, sandwich: int = 2) -> None:
        super().__init__()
        self.space, self.sandwich = space, sandwich
        self.largest = space.arch(space.extreme(largest=True))
        self.smallest = space.arch(space.extreme(largest=False))
        self.body = CNNBody(**self.largest.to_dict())

    def run(self, x: torch.Tensor, arch: CNNArch) -> torch.Tensor:
        """The logits of subnet ``arch`` (BatchNorm on batch statistics)."""
        stem = self.body.stem
        x = F.max_pool2d(torch.relu(_conv_bn(stem[0], stem[1], x, arch.widths[0], 3)), 2)
        for i, stage in enumerate(self.body.stages):
            width, kernel = arch.widths[i], arch.kernels[i]
            blocks = list(stage.children())
            if i > 0:
                x = torch.relu(_conv_bn(blocks[0], blocks[1], x, width, kernel))
                blocks = blocks[3:]
            for block in blocks[: arch.depths[i]]:
                conv1, bn1, _, conv2, bn2 = block.get_submodule("body").children()
                y = _conv_bn(conv2, bn2, torch.relu(_conv_bn(conv1, bn1, x, width, kernel)), width, kernel)
                x = torch.relu(x + y)
        fc = self.body.head.fc
        out: torch.Tensor = F.linear(x.mean(dim=(2, 3)), fc.weight[:, : x.shape[1]], fc.bias)
        return out

    def sample(self) -> CNNArch:
        """A uniformly random architecture, drawn from torch's generator (seeded per epoch by ``fit``)."""
        genes = self.space.genes()
        picks = {name: choices[int(torch.randint(len(choices), ()))] for name, choices in genes.items()}
        return self.space.arch(picks)

    def forward(self, x: torch.Tensor) -> SandwichOutput | torch.Tensor:
        """Training: the sandwich (largest, smallest, ``sandwich`` random); evaluation: the largest."""
        if not self.training:
            return self.run(x, self.largest)
        archs = [self.smallest, *(self.sample() for _ in range(self.sandwich))]
        return SandwichOutput(self.run(x, self.largest), [self.run(x, a) for a in archs])


def sandwich_loss(base: Callable[[Any, Any], torch.Tensor]) -> Callable[[Any, Any], torch.Tensor]:
    """``base`` on the largest subnet plus each other subnet's KL divergence to its soft predictions."""

    def loss(outputs: Any, targets: Any) -> torch.Tensor:
        if not isinstance(outputs, SandwichOutput):
            return base(outputs, targets)
        total = base(outputs.logits, targets)
        soft = F.softmax(outputs.logits.detach(), dim=-1)
        for logits in outputs.subnets:
            total = total + F.kl_div(F.log_softmax(logits, dim=-1), soft, reduction="batchmean")
        return total

    return loss


def _space_tag(space: CNNSpace) -> str:
    return json.dumps(space.to_dict(), sort_keys=True)


def load_or_train(space: CNNSpace, spec: OneShot, ctx: Context, lr: float | None) -> CNNSupernet:
    """The supernet of ``space``: loaded from ``spec.file`` when it holds one of the same space,
    else trained for ``spec.epochs`` (resumable from ``<workdir>/supernet-checkpoints``) and saved."""
    torch.manual_seed(ctx.seed)
    supernet = CNNSupernet(space, spec.sandwich)
    path = spec.file(ctx.workdir)
    if path is not None and path.is_file():
        found = read_state_dict(path)[1].get("space")
        check(found == _space_tag(space), f"nas.search.one_shot.path: {path} holds the supernet of space "
              f"{found}; expected {_space_tag(space)} (delete it or choose another path)")
        load_state_dict_into(supernet, path)
        logger.info("nas.search: loaded the supernet from %s", path)
        return supernet.eval()
    train_ctx = dataclasses.replace(ctx, loss_fn=sandwich_loss(ctx.loss_fn or task_loss))
    folder = ctx.workdir / "supernet-checkpoints" if ctx.workdir is not None else None
    logger.info("nas.search: training the supernet (%d epochs, %d subnets a step)", spec.epochs,
                2 + spec.sandwich)
    fit(supernet, TrainSpec(epochs=spec.epochs, lr=lr), [], train_ctx, checkpoint_dir=folder)
    if path is not None:
        save_state_dict(supernet, path, metadata={"space": _space_tag(space)})
    return supernet.eval()


def _crop(weight: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The first entries of ``weight`` along the channel dimensions, the centre along kernel ones."""
    index = []
    for dim, (have, want) in enumerate(zip(weight.shape, shape)):
        start = (have - want) // 2 if dim >= 2 else 0
        index.append(slice(start, start + want))
    return weight[tuple(index)]


@torch.no_grad()
def _extract(supernet: CNNSupernet, arch: CNNArch) -> SearchableCNN:
    """A standalone network of ``arch`` holding its slice of the supernet's weights (module names
    match: a subnet keeps the first blocks of each stage)."""
    model = build_cnn(arch)
    source = dict(supernet.body.named_parameters())
    for name, param in model.body.named_parameters():
        param.copy_(_crop(source[name], param.shape))
    return model


def recalibrate(model: nn.Module, batches: list[Any], device: str = "cpu") -> nn.Module:
    """Replace every BatchNorm's running statistics by their average over ``batches``; eval mode."""
    return recalibrate_batchnorm(model, batches, "nas.search.one_shot", device)


def calibration(ctx: Context, spec: OneShot) -> list[Any]:
    """The batches that give each subnet its BatchNorm statistics (the first of the calibration data)."""
    data = ctx.calibration_batches("nas.search.one_shot")
    return take_batches(data, spec.calib_batches, batch_size=TrainSpec().batch_size)


def subnet(supernet: CNNSupernet, arch: CNNArch, batches: list[Any], device: str = "cpu") -> SearchableCNN:
    """Subnet ``arch`` sliced from ``supernet`` as a standalone network, BatchNorm recalibrated on
    ``batches`` (see ``calibration``), in eval mode."""
    model = _extract(supernet, arch)
    recalibrate(model, batches, device)
    return model


def from_mapping(raw: Mapping[str, Any] | OneShot | None, where: str) -> OneShot | None:
    """``OneShot`` from a recipe's mapping (unknown keys and wrong types fail)."""
    if raw is None or isinstance(raw, OneShot):
        return raw
    from torchslim.core.config import coerce_fields

    return OneShot(**coerce_fields(OneShot, raw, where))
