"""Generators of teacher-shaped inputs and the teacher-side signals that train them (data-free KD)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchslim.errors import DataError, UnsupportedModuleError

__all__ = ["ImageGenerator", "LatentGaussian", "TeacherTaps", "VectorGenerator", "build_generator",
           "check_fit", "dafl_losses", "input_shape"]


class ImageGenerator(nn.Module):
    """DCGAN-style generator ``z -> (C, H, W)`` as in DAFL: a linear stem at a quarter of the
    size, two (upsample, conv, BN, LeakyReLU) stages, a conv to ``C`` channels, tanh and a
    BatchNorm without affine so each channel of a batch has mean 0 and variance 1."""

    def __init__(self, latent_dim: int, shape: tuple[int, int, int], width: int = 32) -> None:
        super().__init__()
        c, h, w = shape
        self.shape = shape
        self.h0, self.w0, self.width = math.ceil(h / 4), math.ceil(w / 4), width
        self.stem = nn.Sequential(nn.Linear(latent_dim, width * self.h0 * self.w0),
                                  nn.Unflatten(1, (width, self.h0, self.w0)), nn.BatchNorm2d(width))
        self.body = nn.Sequential(
            nn.Upsample(scale_factor=2), nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width),
            nn.LeakyReLU(0.2), nn.Upsample(scale_factor=2), nn.Conv2d(width, width // 2, 3, padding=1),
            nn.BatchNorm2d(width // 2), nn.LeakyReLU(0.2), nn.Conv2d(width // 2, c, 3, padding=1))
        self.head = nn.Sequential(nn.Tanh(), nn.BatchNorm2d(c, affine=False))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.body(self.stem(z))  # (B, C, 4*h0, 4*w0)
        out: torch.Tensor = self.head(x[..., : self.shape[1], : self.shape[2]])  # crop, then normalise
        return out


class VectorGenerator(nn.Module):
    """MLP generator ``z -> (F,)`` for feature-vector inputs; BatchNorm without affine at the end."""

    def __init__(self, latent_dim: int, features: int, width: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(latent_dim, width), nn.BatchNorm1d(width), nn.LeakyReLU(0.2),
            nn.Linear(width, width), nn.BatchNorm1d(width), nn.LeakyReLU(0.2),
            nn.Linear(width, features), nn.BatchNorm1d(features, affine=False))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(z)
        return out


class LatentGaussian(nn.Module):
    """The encoder-free VAE latent: ``z = mu + exp(log_sigma) * eps`` with learned ``mu``,
    ``log_sigma`` per dimension; ``kl()`` is ``KL(N(mu, sigma^2) || N(0, 1))`` summed over dimensions."""

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.mu = nn.Parameter(torch.zeros(latent_dim))
        self.log_sigma = nn.Parameter(torch.zeros(latent_dim))

    def forward(self, eps: torch.Tensor) -> torch.Tensor:
        return self.mu + self.log_sigma.exp() * eps

    def kl(self) -> torch.Tensor:
        return 0.5 * (self.mu.pow(2) + (2 * self.log_sigma).exp() - 1 - 2 * self.log_sigma).sum()


def input_shape(example: Any, who: str) -> tuple[int, ...]:
    """The per-sample shape of a floating ``(B, F)`` or ``(B, C, H, W)`` example batch."""
    if not isinstance(example, torch.Tensor):
        raise UnsupportedModuleError(f"{who}: generates one input tensor per batch; ctx.example_inputs is a "
                                     f"{type(example).__name__}")
    if not example.is_floating_point():
        raise UnsupportedModuleError(f"{who}: the teacher takes {example.dtype} inputs of shape "
                                     f"{tuple(example.shape)} (tokens or indices), which a generator cannot "
                                     "produce; it makes continuous inputs (B, F) or images (B, C, H, W)")
    if example.dim() not in (2, 4):
        raise UnsupportedModuleError(f"{who}: generates inputs of shape (B, F) or (B, C, H, W); "
                                     f"ctx.example_inputs has shape {tuple(example.shape)}")
    return tuple(example.shape[1:])


def build_generator(shape: tuple[int, ...], latent_dim: int) -> nn.Module:
    """An image generator for ``(C, H, W)`` or an MLP generator for ``(F,)``."""
    if len(shape) == 3:
        return ImageGenerator(latent_dim, (shape[0], shape[1], shape[2]))
    return VectorGenerator(latent_dim, shape[0])


def check_fit(generator: nn.Module, teacher: nn.Module, shape: tuple[int, ...], latent_dim: int,
              who: str) -> None:
    """Check that the generator makes ``shape`` and that the teacher maps it to 2-D logits."""
    was = generator.training
    with torch.no_grad():
        made = tuple(generator.train()(torch.zeros(2, latent_dim).normal_()).shape[1:])
        generator.train(was)
        if made != tuple(shape):
            raise DataError(f"{who}: the generator makes samples of shape {made}, the teacher's input "
                            f"(ctx.example_inputs) has shape {tuple(shape)}; they must be equal")
        try:
            out = teacher(torch.zeros(2, *shape))
        except RuntimeError as exc:
            raise DataError(f"{who}: the generator makes samples of shape {made} (from ctx.example_inputs) "
                            f"but the teacher cannot take them: {str(exc).splitlines()[0]}") from exc
    logits = getattr(out, "logits", out)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        found = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise UnsupportedModuleError(f"{who}: needs a classifier teacher with (B, classes) logits; on "
                                     f"inputs of shape {(2, *shape)} it returned {found}")


class TeacherTaps:
    """While active, records the input of the teacher's last ``nn.Linear`` (penultimate features)
    and the BatchNorm statistics gap of every BN layer (as DeepInversion)."""

    def __init__(self, teacher: nn.Module, with_bn: bool) -> None:
        linears = [m for m in teacher.modules() if isinstance(m, nn.Linear)]
        self.last = linears[-1] if linears else None
        self.bns = [m for m in teacher.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                    and m.running_mean is not None and m.running_var is not None] if with_bn else []
        self.features: torch.Tensor | None = None
        self.bn_gaps: list[torch.Tensor] = []

    def _feature_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.features = args[0]

    def _bn_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        dims = [d for d in range(x.dim()) if d != 1]
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        self.bn_gaps.append((mean - module.running_mean).norm() + (var - module.running_var).norm())

    @contextlib.contextmanager
    def active(self) -> Iterator[TeacherTaps]:
        """Hooks on for the duration of the block; always removed."""
        self.features, self.bn_gaps = None, []
        handles = [bn.register_forward_pre_hook(self._bn_hook) for bn in self.bns]
        if self.last is not None:
            handles.append(self.last.register_forward_pre_hook(self._feature_hook))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


def dafl_losses(logits: torch.Tensor, taps: TeacherTaps) -> dict[str, torch.Tensor]:
    """DAFL's three terms: one-hot (CE to argmax), activation (-mean |features|), -entropy of the
    batch-mean softmax; plus the BatchNorm statistics gap (0 when not tapped)."""
    probs = F.softmax(logits, dim=1).mean(dim=0)
    zero = logits.sum() * 0.0
    return {
        "onehot": F.cross_entropy(logits, logits.argmax(dim=1)),
        "activation": -taps.features.abs().mean() if taps.features is not None else zero,
        "entropy": (probs * probs.clamp_min(1e-12).log()).sum(),
        "bn": torch.stack(taps.bn_gaps).sum() if taps.bn_gaps else zero,
    }
