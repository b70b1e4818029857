"""Data-aware low-rank factorisation of Linear (and 1x1 Conv2d) layers, closed form from input statistics."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar

import torch
from torch import nn

from torchslim.core import Context, HookSet, MethodConfig, Outcome, calibration_inputs, check, register
from torchslim.core.layerwise import run_batches
from torchslim.errors import DataError
from torchslim.lowrank._budget import check_budget
from torchslim.lowrank._factor import budget_ranks, check_rank, factorisable, factorise, matrix, rank_of

__all__ = ["DroneConfig", "apply", "drone_factors", "input_covariances", "weighted_spectrum"]

logger = logging.getLogger(__name__)
_NAME = "lowrank.drone"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DroneConfig(MethodConfig):
    """Factorise each Linear to minimise the error on its real inputs, not on its weights.

    Paper: Chen et al., "DRONE: Data-aware Low-rank Compression for Large NLP Models",
    NeurIPS 2021, https://proceedings.neurips.cc/paper/2021/hash/f56de5ef149cf0aedcc8f4797031e229-Abstract.html

    Args:
        rank: Rank kept per layer: a fraction in (0, 1) of ``min(in, out)``, or an integer.
        energy: If set, the smallest rank keeping this share of the squared singular values
            of ``W L`` (the weight seen through the inputs), per layer; overrides ``rank``.
        flops: If set, a budget: the share in (0, 1) of the selected layers' FLOPs to keep,
            with ranks chosen per layer jointly from the spectra of ``W L`` (overrides
            ``rank``; excludes ``energy``).
        damping: Added to the input covariance's diagonal, relative to its mean, so it can
            be factorised when some input directions never occur.
        calib_batches: Calibration batches read from ``ctx.calib_data``.
        targets: Layer selectors: an fqn, ``re:<regex>`` or ``type:<ClassName>``. Linear
            layers and unpadded 1x1 Conv2d with ``groups=1`` (``type:Conv2d``) qualify.
        ignore: Selectors removed from ``targets``.

    Recipe:
        - method: lowrank.drone
          rank: 0.25
          calib_batches: 32
        # or: 40% of the Linears' FLOPs, ranks chosen per layer from the calibration data
        - method: lowrank.drone
          flops: 0.4

    Notes:
        With ``C = X^T X / n = L L^T`` the input covariance of a layer (one forward pass over
        the calibration batches, all layers at once; ``L = Q sqrt(Lambda)`` from its
        eigendecomposition), the rank-r ``M`` minimising ``||X W^T - X M^T||`` is
        ``(W L)_r L^+``, from one SVD of ``W L``: directions the
        inputs never take cost nothing, frequent ones are kept. Needs ``ctx.calib_data``
        (never the evaluation set); padding tokens count as inputs. Layers are factorised
        only where it reduces FLOPs; a rank at or above ``min(in, out)`` is skipped with a
        warning. Same deployment as ``lowrank.svd``: two thinner dense Linears (1x1 convs).
        With ``flops`` the ranks come from the same allocator as ``lowrank.svd``'s, fed with
        the singular values of ``W L``: the energy a component keeps is the share of the
        layer's output error on the calibration inputs it removes. FLOPs only, no latency
        budget (``torchslim.core`` has no latency model); ranks in the outcome's ``layers``,
        the share reached in its stats (``flops_share``).
    """

    name: ClassVar[str] = _NAME
    rank: float = 0.25
    energy: float | None = None
    flops: float | None = None
    damping: float = 1e-4
    calib_batches: int = 32
    targets: tuple[str, ...] = ("type:Linear",)
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_rank(_NAME, self.rank, self.energy)
        check_budget(_NAME, self.flops, self.energy)
        check(self.damping >= 0, f"{_NAME}: damping must be >= 0; found {self.damping!r}")
        check(self.calib_batches >= 1, f"{_NAME}: calib_batches must be >= 1; found {self.calib_batches!r}")


@torch.no_grad()
def input_covariances(model: nn.Module, layers: dict[str, nn.Module],
                      inputs: list[Any]) -> dict[str, torch.Tensor]:
    """``X^T X / n`` (float64) of every layer's inputs over the calibration ``inputs``.

    A 1x1 conv's rows are its input pixels at its stride: one vector of channels each.
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def record(fqn: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            if isinstance(module, nn.Conv2d):
                x = x[..., ::module.stride[0], ::module.stride[1]].movedim(-3, -1)
            x = x.reshape(-1, x.shape[-1]).double()
            sums[fqn] = sums[fqn] + x.T @ x if fqn in sums else x.T @ x
            counts[fqn] = counts.get(fqn, 0) + x.shape[0]
        return hook

    with HookSet() as hooks:
        for fqn, layer in layers.items():
            hooks.forward_pre(layer, record(fqn))
        run_batches(model, inputs)
    return {fqn: sums[fqn] / counts[fqn] for fqn in sums}


def _root(cov: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors ``Q`` and root eigenvalues of the damped ``cov``: ``L = Q sqrt(values)``."""
    eye = torch.eye(cov.shape[0], dtype=torch.float64)
    cov = cov.double() + damping * cov.diagonal().mean().clamp_min(1e-12) * eye
    values, vectors = torch.linalg.eigh(cov)
    return vectors, values.clamp_min(0).sqrt()


def weighted_spectrum(weight: torch.Tensor, cov: torch.Tensor, damping: float = 1e-4) -> torch.Tensor:
    """Singular values of ``W L``: what each rank-1 component is worth on the calibration inputs."""
    vectors, root_values = _root(cov, damping)
    singular: torch.Tensor = torch.linalg.svdvals(weight.detach().double() @ (vectors * root_values))
    return singular


def drone_factors(weight: torch.Tensor, cov: torch.Tensor, rank: float, energy: float | None = None,
                  damping: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first, second)``: ``second @ first`` minimises the output error under covariance ``cov``."""
    w = weight.detach().double()
    vectors, root_values = _root(cov, damping)
    keep = root_values > root_values.max() * 1e-7  # directions the inputs never take
    u, s, vh = torch.linalg.svd(w @ (vectors * root_values), full_matrices=False)
    r = rank_of(rank, min(w.shape), s, energy)
    root = s[:r].sqrt()
    inverse = torch.where(keep, 1 / root_values.clamp_min(1e-30), torch.zeros_like(root_values))
    right = (vh[:r] * inverse) @ vectors.T  # vh_r L^+
    return (root[:, None] * right).float(), (u[:, :r] * root).float()


@register(DroneConfig)
def apply(model: nn.Module, cfg: DroneConfig, ctx: Context) -> Outcome:
    """Measure input covariances on calibration data, then factorise each selected Linear."""
    layers = factorisable(model, cfg.targets, cfg.ignore, _NAME)
    covs = input_covariances(model, layers, calibration_inputs(ctx, cfg.calib_batches, _NAME))
    if layers and not covs:
        raise DataError(f"{_NAME}: the calibration batches reached none of the {len(layers)} selected layers "
                        f"(first: {next(iter(layers))}); expected inputs the model runs on")
    for fqn in sorted(set(layers) - set(covs)):
        logger.warning("%s: %s never received an input during calibration; left as it is", _NAME, fqn)

    ranks: dict[str, int | None] = {}
    stats: dict[str, float] = {}
    if cfg.flops is not None:
        ranks, stats["flops_share"] = budget_ranks(
            model, {f: layers[f] for f in covs}, ctx, cfg.flops, _NAME,
            lambda fqn, layer: weighted_spectrum(matrix(layer), covs[fqn], cfg.damping))

    def factors(fqn: str, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
        rank = cfg.rank if cfg.flops is None else ranks.get(fqn)
        if fqn not in covs or rank is None:
            return None
        return drone_factors(matrix(layer), covs[fqn], rank, cfg.energy, cfg.damping)

    return factorise(model, layers, _NAME, factors, stats)
