"""Weight sharing by per-layer k-means: each weight becomes an index into 2**bits shared values."""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar, Literal

import torch
from torch import nn

from torchslim.core import Context, MethodConfig, Outcome, check, register, select, surgery
from torchslim.sharing.modules import ClusteredConv2d, ClusteredLinear

__all__ = ["KMeansSharingConfig", "apply", "kmeans_1d"]

logger = logging.getLogger(__name__)
_NAME = "sharing.kmeans"


@dataclasses.dataclass(frozen=True, kw_only=True)
class KMeansSharingConfig(MethodConfig):
    """Cluster each layer's weights to ``2**bits`` shared values; the centroids stay trainable.

    Paper: Han et al., "Deep Compression: Compressing Deep Neural Networks with Pruning,
    Trained Quantization and Huffman Coding", ICLR 2016, https://arxiv.org/abs/1510.00149

    Args:
        bits: Index width, 1..16: ``2**bits`` centroids per layer (the paper: 8 for conv, 5 for fc).
        init: Initial centroids: ``linear`` (evenly spaced between min and max; the paper's
            best) or ``density`` (quantiles of the weight distribution).
        iterations: Lloyd iterations of 1-D k-means.
        targets: Layer selectors: an fqn, ``re:<regex>`` or ``type:<ClassName>``.
        ignore: Selectors removed from ``targets``.

    Recipe:
        - method: sharing.kmeans
          bits: 5
          targets: ["type:Linear"]
        - method: sharing.kmeans
          bits: 8
          targets: ["type:Conv2d"]

    Notes:
        A selected ``nn.Linear`` / ``nn.Conv2d`` becomes ``ClusteredLinear`` /
        ``ClusteredConv2d``: integer indices (a buffer) into a codebook (a parameter). A
        ``train`` block in the same or a later stage fine-tunes the centroids: autograd sums
        the gradients of all weights sharing a centroid, as in the paper. In a layer that
        already has zeros (pruned before), zero is its own centroid pinned at 0.0, so pruned
        weights stay pruned. Indices are stored as uint8 (or int16 above 8 bits);
        ``sharing.huffman`` entropy-codes them for the smallest file. Speed is unchanged.
    """

    name: ClassVar[str] = _NAME
    bits: int = 5
    init: Literal["linear", "density"] = "linear"
    iterations: int = 30
    targets: tuple[str, ...] = ("type:Linear", "type:Conv2d")
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check(1 <= self.bits <= 16, f"{_NAME}: bits must be an integer in 1..16; found {self.bits!r}")
        check(self.init in ("linear", "density"),
              f"{_NAME}: init must be linear or density; found {self.init!r}")
        check(self.iterations >= 0, f"{_NAME}: iterations must be >= 0; found {self.iterations!r}")


@torch.no_grad()
def kmeans_1d(values: torch.Tensor, k: int, init: str = "linear",
              iterations: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted centroids (k,) and each value's index, by Lloyd's algorithm in one dimension."""
    x = values.detach().double().flatten()
    distinct = torch.unique(x)
    if len(distinct) <= k:  # every value is its own centroid: exact
        centroids = distinct
    elif init == "density":
        centroids = torch.quantile(x, torch.linspace(0, 1, k, dtype=x.dtype))
    else:
        centroids = torch.linspace(float(x.min()), float(x.max()), k, dtype=x.dtype)
    for _ in range(iterations if len(distinct) > k else 0):
        index = _nearest(x, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, index, x)
        counts = torch.zeros_like(centroids).index_add_(0, index, torch.ones_like(x))
        moved = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
        if torch.equal(moved, centroids):
            break
        centroids = moved.sort().values
    return centroids.float(), _nearest(x, centroids).reshape(values.shape)


def _nearest(x: torch.Tensor, sorted_centroids: torch.Tensor) -> torch.Tensor:
    bounds = (sorted_centroids[1:] + sorted_centroids[:-1]) / 2
    return torch.searchsorted(bounds, x)


def _clustered(module: nn.Module, cfg: KMeansSharingConfig) -> nn.Module:
    assert isinstance(module.weight, torch.Tensor)
    weight = module.weight.detach()
    zeros = weight == 0
    fixed_zero = bool(zeros.any()) and cfg.bits >= 2
    k = 2**cfg.bits - (1 if fixed_zero else 0)
    centroids, index = kmeans_1d(weight[~zeros] if fixed_zero else weight, k, cfg.init, cfg.iterations)
    if isinstance(module, nn.Linear):
        new: ClusteredLinear | ClusteredConv2d = ClusteredLinear(
            module.in_features, module.out_features, cfg.bits, module.bias is not None, fixed_zero)
    else:
        assert isinstance(module, nn.Conv2d)
        new = ClusteredConv2d(module.in_channels, module.out_channels, module.kernel_size,  # type: ignore[arg-type]
                              module.stride, module.padding, module.dilation, module.groups,  # type: ignore[arg-type]
                              module.bias is not None, cfg.bits, fixed_zero)
    with torch.no_grad():
        offset = 1 if fixed_zero else 0
        new.codebook[offset:offset + len(centroids)] = centroids
        full = torch.zeros(weight.shape, dtype=torch.long)
        if fixed_zero:
            full[~zeros] = index + 1
        else:
            full = index
        new.indices.copy_(full.to(new.indices.dtype))
        if module.bias is not None and new.bias is not None:
            new.bias.copy_(module.bias)
    return new.to(weight.device).train(module.training)


@register(KMeansSharingConfig)
def apply(model: nn.Module, cfg: KMeansSharingConfig, ctx: Context) -> Outcome:
    """Replace each selected Linear / Conv2d by its clustered version."""
    selected = select(model, cfg.targets, cfg.ignore)
    chosen = surgery.plain_layers(model, selected, (nn.Linear, nn.Conv2d), _NAME)
    replaced = surgery.replace_modules(model, list(chosen.items()), lambda fqn, m: _clustered(m, cfg))
    return Outcome(model=model, touched=replaced, structure={f: {} for f in replaced},
                   stats={"bits": cfg.bits, "layers": len(replaced)},
                   layers={f: {"bits": cfg.bits} for f in replaced})
