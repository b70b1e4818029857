"""DeepInversion: training inputs synthesised from the teacher's BatchNorm statistics (data-free)."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from torchslim.core import Context, MethodConfig, Step, TrainedMethod, check, register
from torchslim.core.hooks import frozen
from torchslim.distillation._outputs import logits_of
from torchslim.distillation._preview import preview_png
from torchslim.distillation.losses import soft_target_loss
from torchslim.errors import DataError, UnsupportedModuleError

__all__ = ["InversionConfig", "InversionDistillation", "synthesize"]

logger = logging.getLogger(__name__)
_NAME = "distillation.inversion"


@dataclasses.dataclass(frozen=True, kw_only=True)
class InversionConfig(MethodConfig):
    """Distil without data: invert the teacher's BatchNorm statistics into training images.

    Paper: Yin et al., "Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion",
    CVPR 2020, https://arxiv.org/abs/1912.08795

    Args:
        samples: Synthetic inputs made when the stage has no training data.
        batch_size: Inputs optimised together (BatchNorm statistics are matched per batch).
        iterations: Adam steps per synthetic batch.
        lr: Learning rate of the inputs.
        bn_weight: Weight of the BatchNorm statistics loss (mean and variance per channel).
        tv_weight: Weight of the total-variation image prior.
        l2_weight: Weight of the L2 image prior.
        jitter: Random shift, in pixels, applied at every step.
        temperature: Soft-target temperature of the distillation loss on the synthetic inputs.
        input_range: ``[low, high]`` of valid input values (e.g. ``[0, 1]`` for images the
            model normalises itself): inputs start as uniform noise in it and are clipped to it
            after every step, as DeepInversion clips to valid pixels. None: unbounded, from
            N(0, 1) noise (inputs already standardised).

    Recipe:
        - method: distillation.inversion
          samples: 4096
          iterations: 200
          input_range: [0, 1]

    Lifecycle:
        synthesize: only when the stage has no training data: ``samples`` inputs shaped like
            ``ctx.example_inputs``, each batch optimised from noise so the teacher classifies
            it as a chosen class (balanced), its BatchNorm inputs match the running mean and
            variance, and it is smooth (TV, L2). Saved as ``synthetic.safetensors`` in the
            stage's work folder when there is one. Seeded by ``ctx.seed``.
        extra_loss: ``T^2 * KL`` between the teacher's and the student's softened outputs;
            the task loss on the synthetic labels gets weight 0.
        on_end: nothing to undo.

    Notes:
        The teacher must contain BatchNorm layers (their running statistics are the only
        knowledge of the data); a teacher without them is an error. With real training data
        in the stage the method is plain soft-target distillation. ``synthesize(teacher, ...)``
        makes samples for other uses too (e.g. calibration of static quantization).
    """

    name: ClassVar[str] = _NAME
    samples: int = 2048
    batch_size: int = 256
    iterations: int = 200
    lr: float = 0.1
    bn_weight: float = 1.0
    tv_weight: float = 1e-4
    l2_weight: float = 1e-5
    jitter: int = 2
    temperature: float = 4.0
    input_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        check(self.samples >= 1 and self.batch_size >= 1 and self.iterations >= 0,
              f"{_NAME}: samples and batch_size must be >= 1 and iterations >= 0")
        check(self.lr > 0 and self.temperature > 0, f"{_NAME}: lr and temperature must be > 0")
        check(min(self.bn_weight, self.tv_weight, self.l2_weight) >= 0 and self.jitter >= 0,
              f"{_NAME}: loss weights and jitter must be >= 0")
        if self.input_range is not None:
            bounds = tuple(self.input_range) if isinstance(self.input_range, (list, tuple)) else ()
            numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bounds)
            check(len(bounds) == 2 and numbers and bounds[0] < bounds[1],
                  f"{_NAME}: input_range must be [low, high] with low < high; found {self.input_range!r}")
            object.__setattr__(self, "input_range", (float(bounds[0]), float(bounds[1])))


def _bn_layers(teacher: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in teacher.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.running_mean is not None and m.running_var is not None]


def _image_prior(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tv = (x[..., 1:, :] - x[..., :-1, :]).pow(2).mean() + (x[..., :, 1:] - x[..., :, :-1]).pow(2).mean()
    return tv, x.pow(2).mean()


def _invert_batch(teacher: nn.Module, shape: tuple[int, ...], labels: torch.Tensor, cfg: InversionConfig,
                  generator: torch.Generator) -> torch.Tensor:
    bns = _bn_layers(teacher)
    stats: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        dims = [d for d in range(x.dim()) if d != 1]
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        stats.append((mean - module.running_mean).norm() + (var - module.running_var).norm())

    handles = [bn.register_forward_pre_hook(hook) for bn in bns]
    if cfg.input_range is None:
        x = torch.randn(shape, generator=generator).requires_grad_(True)
    else:
        low, high = cfg.input_range
        x = (low + (high - low) * torch.rand(shape, generator=generator)).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg.lr)
    try:
        for _ in range(cfg.iterations):
            stats.clear()
            dx, dy = (int(v) for v in torch.randint(-cfg.jitter, cfg.jitter + 1, (2,), generator=generator))
            shifted = torch.roll(x, shifts=(dx, dy), dims=(-2, -1)) if x.dim() == 4 else x
            loss = F.cross_entropy(logits_of(teacher(shifted), _NAME), labels)
            loss = loss + cfg.bn_weight * torch.stack(stats).sum()
            if x.dim() == 4:
                tv, l2 = _image_prior(x)
                loss = loss + cfg.tv_weight * tv + cfg.l2_weight * l2
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            if cfg.input_range is not None:
                with torch.no_grad():
                    x.clamp_(*cfg.input_range)
    finally:
        for h in handles:
            h.remove()
    return x.detach()


def synthesize(teacher: nn.Module, example: torch.Tensor, cfg: InversionConfig,
               seed: int = 0) -> torch.utils.data.TensorDataset:
    """``cfg.samples`` inputs shaped like ``example``'s rows, with the classes they were made for."""
    if not _bn_layers(teacher):
        raise UnsupportedModuleError(f"{_NAME}: the teacher has no BatchNorm layers with running statistics, "
                                     "which inversion matches; use distillation.datafree (generator: gan "
                                     "or vae), which needs no BatchNorm, or real data")
    generator = torch.Generator().manual_seed(seed)
    images, labels = [], []
    with frozen(teacher):  # the caller's modes and requires_grad flags come back afterwards
        with torch.no_grad():
            classes = logits_of(teacher(example[:1]), _NAME).shape[-1]
        for start in range(0, cfg.samples, cfg.batch_size):
            n = min(cfg.batch_size, cfg.samples - start)
            y = torch.arange(start, start + n) % classes
            images.append(_invert_batch(teacher, (n, *example.shape[1:]), y, cfg, generator))
            labels.append(y)
            logger.info("%s: %d / %d synthetic samples", _NAME, start + n, cfg.samples)
    return torch.utils.data.TensorDataset(torch.cat(images), torch.cat(labels))


@register(InversionConfig)
class InversionDistillation(TrainedMethod):
    """Makes the training data when there is none; distils on soft targets."""

    needs_teacher = True
    cfg: InversionConfig

    def on_start(self, model: nn.Module, ctx: Context) -> nn.Module:
        if ctx.teacher is None or not _bn_layers(ctx.teacher):
            raise UnsupportedModuleError(f"{_NAME}: needs a teacher with BatchNorm layers (their running "
                                         "statistics are what inversion matches)")
        return model

    def synthesize(self, ctx: Context) -> Any:
        if ctx.teacher is None:
            raise DataError(f"{_NAME}: data-free training needs a teacher (ctx.teacher or teacher: original)")
        example = ctx.require_example_inputs(_NAME)
        data = synthesize(ctx.teacher, example, self.cfg, ctx.seed)
        if ctx.workdir is not None:
            from safetensors.torch import save_file

            Path(ctx.workdir).mkdir(parents=True, exist_ok=True)
            save_file({"inputs": data.tensors[0].contiguous(), "labels": data.tensors[1].contiguous()},
                      str(Path(ctx.workdir) / "synthetic.safetensors"))
            if importlib.util.find_spec("matplotlib") is not None:
                png = preview_png(data.tensors[0], data.tensors[1], f"{_NAME}: samples and their classes")
                (Path(ctx.workdir) / "plots").mkdir(exist_ok=True)
                (Path(ctx.workdir) / "plots" / "inversion-samples.png").write_bytes(png)
        return data

    def task_weight(self) -> float:
        return 0.0  # the synthetic labels are only what the inputs were optimised for

    def extra_loss(self, step: Step) -> torch.Tensor:
        student = logits_of(step.outputs, _NAME)
        teacher = logits_of(step.teacher_outputs(), _NAME)
        return soft_target_loss(student, teacher, self.cfg.temperature)
