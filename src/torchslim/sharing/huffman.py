"""Entropy-coded storage of clustered weights: the last step of Deep Compression."""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar

from torch import nn

from torchslim.core import Context, MethodConfig, Outcome, register
from torchslim.core.storage import entropy_coded_bytes
from torchslim.errors import UnsupportedModuleError
from torchslim.sharing.modules import ClusteredConv2d, ClusteredLinear

__all__ = ["HuffmanConfig", "apply"]

logger = logging.getLogger(__name__)
_NAME = "sharing.huffman"


@dataclasses.dataclass(frozen=True, kw_only=True)
class HuffmanConfig(MethodConfig):
    """Store the cluster indices of shared-weight layers Huffman-coded, so frequent values cost fewer bits.

    Paper: Han et al., "Deep Compression: Compressing Deep Neural Networks with Pruning,
    Trained Quantization and Huffman Coding", ICLR 2016, https://arxiv.org/abs/1510.00149

    Args:
        min_saving: Code a layer only if it saves at least this fraction of its index bytes.

    Recipe:
        - method: sharing.huffman  # listed after {method: sharing.kmeans, bits: 5}
          min_saving: 0.0

    Notes:
        Applies to the layers ``sharing.kmeans`` made (it must run first, in the same or an
        earlier stage). Indices are coded with a canonical Huffman code per layer, built from
        the index frequencies when the file is written (after any fine-tuning), and the file
        decodes exactly to the same indices. Pruned weights cluster at the pinned zero, the
        most frequent index; a mostly-zero layer is then stored as in the paper: only its
        nonzero indices, each with the gap since the previous one, both Huffman-coded (a dense
        code spends at least 1 bit on every zero, which caps the gain near 32x at 5 bits).
        The report lists bits per weight per layer. The model in memory and its speed are
        unchanged: this is a storage format.
    """

    name: ClassVar[str] = _NAME
    min_saving: float = 0.0


@register(HuffmanConfig)
def apply(model: nn.Module, cfg: HuffmanConfig, ctx: Context) -> Outcome:
    """Flag every clustered layer whose indices code smaller; report bits per weight."""
    clustered = {f: m for f, m in model.named_modules() if isinstance(m, (ClusteredLinear, ClusteredConv2d))}
    if not clustered:
        raise UnsupportedModuleError(f"{_NAME}: the model has no clustered layers; run sharing.kmeans first "
                                     "(for example in the same stage, listed before sharing.huffman)")
    layers: dict[str, dict[str, float]] = {}
    for fqn, module in clustered.items():
        indices = module.indices
        raw = indices.numel() * indices.element_size()
        size = entropy_coded_bytes(indices)  # the smaller of dense and sparse Huffman coding
        if size >= raw or size > (1 - cfg.min_saving) * raw:
            logger.info("%s: %s: Huffman coding saves too little; indices stay raw", _NAME, fqn)
            continue
        module.entropy_coded = True
        layers[fqn] = {"bits_per_weight": round(8 * size / indices.numel(), 3),
                       "index_bits": float(module.bits)}
    total = sum(clustered[f].indices.numel() for f in layers)
    mean = sum(v["bits_per_weight"] * clustered[f].indices.numel() for f, v in layers.items()) / max(total, 1)
    structure: dict[str, dict[str, object]] = {f: {"attrs": ["entropy_coded"]} for f in layers}
    return Outcome(model=model, touched=tuple(layers), structure=structure,
                   stats={"layers": len(layers), "bits_per_weight": round(mean, 3)}, layers=layers)
