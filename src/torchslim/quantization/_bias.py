"""Empirical bias correction of static int8 layers (Nagel et al., "Data-Free Quantization
Through Weight Equalization and Bias Correction", ICCV 2019, section 4.2, with measured means).

Rounding weights and activations shifts the mean of each output channel; the shift adds up
through the network. Layer by layer in execution order, the mean pre-activation of the int8
layer (fed by the already corrected int8 layers before it) is compared with the float layer's
on the same calibration data, and the difference is taken out of the int32 bias.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from torchslim.core.layerwise import model_call
from torchslim.quantization.static_modules import QDQConv2d, QDQLinear

__all__ = ["correct_biases"]


class _Reached(Exception):
    """Raised by a hook to stop the forward pass at the layer being corrected."""


def _channel_mean(y: torch.Tensor, conv: bool) -> torch.Tensor:
    if conv:  # (N, C, H, W)
        return y.float().transpose(0, 1).reshape(y.shape[1], -1).mean(1)
    return y.float().reshape(-1, y.shape[-1]).mean(0)


@torch.no_grad()
def correct_biases(quantized: nn.Module, reference: nn.Module, layers: list[str], batches: list[Any],
                   names: dict[str, str] | None = None) -> None:
    """Shift the int32 bias of each of ``layers`` (QDQ layers of ``quantized``, in execution
    order) so its mean pre-activation over ``batches`` equals that of the same-named float
    layer of ``reference`` (a model of ``FusedFloat`` layers); ``names`` maps a layer's name in
    ``reference`` to its name in ``quantized`` where they differ (a wrapper moved it)."""
    targets = _float_means(reference, layers, batches)
    limit = 2.0**31 - 1
    for fqn in layers:
        layer = quantized.get_submodule((names or {}).get(fqn, fqn))
        assert isinstance(layer, QDQConv2d | QDQLinear)
        mean = _int8_mean(quantized, layer, batches)
        if mean is None or fqn not in targets:
            continue
        shift = (mean - targets[fqn]).double() / layer.bias_scale.double()
        layer.qbias.copy_(torch.round(layer.qbias.double() - shift).clamp_(-limit, limit).to(torch.int32))


def _float_means(reference: nn.Module, layers: list[str], batches: list[Any]) -> dict[str, torch.Tensor]:
    """Per layer, the mean pre-activation of each channel of the float reference: the output
    of the Conv2d / Linear inside each ``FusedFloat``, before its activation."""
    means: dict[str, torch.Tensor] = {}

    def see(fqn: str, module: nn.Module, y: torch.Tensor) -> None:
        mean = _channel_mean(y, isinstance(module, nn.Conv2d)) / len(batches)
        means[fqn] = means[fqn] + mean if fqn in means else mean

    handles = [reference.get_submodule(f"{fqn}.layer").register_forward_hook(
        lambda m, _args, out, fqn=fqn: see(fqn, m, out)) for fqn in layers]
    try:
        for batch in batches:
            args, kwargs = model_call(reference, batch)
            reference(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return means


def _int8_mean(quantized: nn.Module, layer: QDQConv2d | QDQLinear, batches: list[Any]) -> torch.Tensor | None:
    """The mean pre-activation of each channel of ``layer`` in the int8 model; each forward pass
    stops when it reaches the layer, which computes its pre-activation once, in the hook."""
    seen: list[torch.Tensor] = []

    def stop(_m: nn.Module, args: tuple[Any, ...]) -> None:
        seen.append(_channel_mean(layer.pre_activation(args[0]), isinstance(layer, QDQConv2d)))
        raise _Reached

    handle = layer.register_forward_pre_hook(stop)
    try:
        for batch in batches:
            args, kwargs = model_call(quantized, batch)
            with contextlib.suppress(_Reached):
                quantized(*args, **kwargs)
    finally:
        handle.remove()
    return torch.stack(seen).mean(0) if seen else None
