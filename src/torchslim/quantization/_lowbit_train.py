"""What quantization.binary and quantization.ternary share: layer choice, the training-time
wrapper with straight-through gradients, and the swap to packed layers at the end."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from torchslim.core import Context, Outcome, TrainedMethod, check, select, surgery
from torchslim.errors import UnsupportedModuleError
from torchslim.quantization.lowbit import _Packed, _PackedConv2d, _PackedLinear, lowbit_forward

__all__ = ["LowBitMethod", "LowBitTraining", "lowbit_layers"]

_TYPES = (nn.Linear, nn.Conv2d)


def check_flags(name: str, cfg: object, fields: tuple[str, ...]) -> None:
    """Each of ``cfg``'s ``fields`` is a bool (a config built in Python skips the recipe's typing)."""
    for field in fields:
        value = getattr(cfg, field)
        check(isinstance(value, bool), f"{name}: {field} must be true or false; found {value!r}")


def lowbit_layers(model: nn.Module, targets: tuple[str, ...], ignore: tuple[str, ...],
                  keep_first_last: bool, who: str) -> dict[str, nn.Module]:
    """Selected plain, untied Linear / Conv2d layers, without the model's first and last ones.

    "First" and "last" are the first and last ``nn.Linear`` / ``nn.Conv*`` modules of the
    whole model in registration order, whether selected or not.

    Raises:
        UnsupportedModuleError: no layer is left to quantize.
    """
    chosen = surgery.plain_layers(model, select(model, targets, ignore), _TYPES, who, "stay float")
    if keep_first_last:
        weighted = [f for f, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
        for fqn in {weighted[0], weighted[-1]} if weighted else set():
            chosen.pop(fqn, None)
    if not chosen:
        edges = " (keep_first_last keeps the first and last layers float; set it to false to "\
                "quantize them too)" if keep_first_last else ""
        raise UnsupportedModuleError(
            f"{who}: expected at least one plain, untied nn.Linear / nn.Conv2d selected by targets "
            f"{list(targets)} minus ignore {list(ignore)}; found none in {type(model).__name__}{edges}")
    return chosen


class LowBitTraining(nn.Module):
    """Training-time stand-in: the float layer's weight quantized on every forward (STE)."""

    def __init__(self, layer: nn.Module, quantize: Callable[[torch.Tensor], torch.Tensor],
                 activations: bool) -> None:
        super().__init__()
        self.layer, self.quantize, self.activations = layer, quantize, activations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.layer.weight
        assert isinstance(weight, torch.Tensor)
        bias = self.layer.bias
        assert bias is None or isinstance(bias, torch.Tensor)
        return lowbit_forward(self.layer, x, self.quantize(weight), bias, self.activations)


class LowBitMethod(TrainedMethod):
    """Wraps the layers on start, packs them on end; subclasses say how weights are quantized."""

    who = ""
    packed: tuple[type[_PackedLinear], type[_PackedConv2d]]
    bits = 1
    activations = False

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self._fqns: tuple[str, ...] = ()

    def quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """The quantized weight, with the straight-through gradient."""
        raise NotImplementedError

    def codes(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Signs (-1 / 0 / +1, the weight's shape) and the per-row scales of ``weight``."""
        raise NotImplementedError

    def on_start(self, model: nn.Module, ctx: Context) -> nn.Module:
        """Wrap each chosen layer so that training sees its quantized weight."""
        layers = lowbit_layers(model, self.cfg.targets, self.cfg.ignore, self.cfg.keep_first_last, self.who)
        self._fqns = surgery.replace_modules(
            model, list(layers.items()), lambda fqn, m: LowBitTraining(m, self.quantize, self.activations))
        return model

    def on_end(self, model: nn.Module, ctx: Context) -> Outcome:
        """Replace each wrapper by its packed layer (codes from the trained float weights)."""
        layers: dict[str, dict[str, Any]] = {}
        sizes = [0, 0]  # bytes of the float weights, of the packed codes + scales

        def build(fqn: str, wrapper: nn.Module) -> nn.Module:
            assert isinstance(wrapper, LowBitTraining)
            new = self._packed_layer(wrapper.layer)
            sizes[0] += 4 * new.scale.numel() * new.signs().shape[1:].numel()
            sizes[1] += new.packed.numel() + 4 * new.scale.numel()
            layers[fqn] = {"bits": self.bits, "scale_mean": round(float(new.scale.mean()), 6)}
            return new

        matches = [(f, model.get_submodule(f)) for f in self._fqns]
        replaced = surgery.replace_modules(model, matches, build)
        return Outcome(model=model, touched=replaced, structure={f: {} for f in replaced}, layers=layers,
                       stats={"layers": len(replaced), "bits": self.bits,
                              "weight_bytes_ratio": round(sizes[0] / max(sizes[1], 1), 2)})

    @torch.no_grad()
    def _packed_layer(self, layer: nn.Module) -> _Packed:
        weight = layer.weight
        assert isinstance(weight, torch.Tensor)
        signs, scale = self.codes(weight.detach().float())
        bias = layer.bias is not None
        new: _Packed
        if isinstance(layer, nn.Linear):
            new = self.packed[0](layer.in_features, layer.out_features, bias, self.activations)
        else:
            assert isinstance(layer, nn.Conv2d)
            new = self.packed[1](layer.in_channels, layer.out_channels, layer.kernel_size,  # type: ignore[arg-type]
                                 layer.stride, layer.padding, layer.dilation, layer.groups,  # type: ignore[arg-type]
                                 bias, self.activations)
        assert layer.bias is None or isinstance(layer.bias, torch.Tensor)
        new.set_weight(signs, scale, layer.bias)
        return new.to(weight.device).train(layer.training)
