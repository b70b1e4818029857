"""Binary weights (XNOR-Net / BWN): ``alpha * sign(W)``, trained with a straight-through estimator."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from torchslim.core import MethodConfig, register
from torchslim.quantization._lowbit_train import LowBitMethod, check_flags
from torchslim.quantization.lowbit import BinaryConv2d, BinaryLinear, binarize

__all__ = ["BinaryQuantization", "BinaryQuantizationConfig"]

_NAME = "quantization.binary"


@dataclasses.dataclass(frozen=True, kw_only=True)
class BinaryQuantizationConfig(MethodConfig):
    """Binarise weights to ``alpha * sign(W)`` (one ``alpha = mean |W|`` per output channel).

    Paper: Rastegari et al., "XNOR-Net: ImageNet Classification Using Binary Convolutional
    Neural Networks", ECCV 2016, https://arxiv.org/abs/1603.05279

    Args:
        activations: Binarise the layers' inputs too (XNOR-Net): ``sign(x)`` with the
            input scale ``K`` (mean ``|x|`` over the input channels; for a convolution also
            averaged over each kernel window) multiplied into the output.
        keep_first_last: Keep the model's first and last Linear / Conv layers (in registration
            order) in float, as the paper does: they hold few weights and cost much accuracy.
        targets: Layer selectors: an fqn, ``re:<regex>`` or ``type:<ClassName>``.
        ignore: Selectors removed from ``targets``.

    Recipe:
        - method: quantization.binary
          activations: false
          keep_first_last: true

    Lifecycle:
        on_start: wrap each chosen layer; every forward uses ``alpha * sign(W)`` (0 counts as
            +1) computed from the float weights, which the optimizer keeps updating. The
            gradient reaches ``W`` through ``alpha`` and, where ``|W| <= 1``, straight through
            ``sign`` (clipped STE); binarised inputs likewise pass gradient where ``|x| <= 1``.
        on_end: replace each layer by a ``BinaryLinear`` / ``BinaryConv2d`` storing 1 bit per
            weight (8 per byte) plus one float32 scale per output channel.

    Notes:
        Needs a ``train`` block: binarising a trained float model without fine-tuning loses
        most of its accuracy. Sign 0 maps to +1, so training and the packed layer compute the
        same function. The saved weights of a binarised layer are about 32x smaller (the bias
        and the scales stay float32). The packed layers unpack the signs and multiply in float:
        the file shrinks, inference is not faster (no XNOR-popcount kernel). Tied weights and
        Linear subclasses read by their owners (``nn.MultiheadAttention.out_proj``) stay float.
        With ``activations``, a layer right after a ReLU sees only +1 inputs (its input is never
        negative): put binarised layers after BatchNorm, as XNOR-Net orders its blocks
        (BatchNorm, binarise, convolution, pooling).
    """

    name: ClassVar[str] = _NAME
    activations: bool = False
    keep_first_last: bool = True
    targets: tuple[str, ...] = ("type:Linear", "type:Conv2d")
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_flags(_NAME, self, ("activations", "keep_first_last"))


@register(BinaryQuantizationConfig)
class BinaryQuantization(LowBitMethod):
    """XNOR-Net binarisation during training, packed 1-bit layers at the end."""

    cfg: BinaryQuantizationConfig
    who = _NAME
    packed = (BinaryLinear, BinaryConv2d)
    bits = 1

    def __init__(self, cfg: BinaryQuantizationConfig) -> None:
        super().__init__(cfg)
        self.activations = cfg.activations

    def quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """``alpha * sign(W)`` with the clipped straight-through gradient."""
        return binarize(weight)

    def codes(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Signs (0 -> +1) and ``alpha = mean |W|`` per output row."""
        signs = torch.where(weight >= 0, 1.0, -1.0)
        return signs, weight.reshape(weight.shape[0], -1).abs().mean(dim=1)
