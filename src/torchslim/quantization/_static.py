"""What static PTQ and QAT share: fusion, the calibration passes, and the swap to QDQ layers."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from torchslim.core import surgery
from torchslim.core.context import to_device
from torchslim.core.layerwise import model_call
from torchslim.core.select import select
from torchslim.errors import UnsupportedModuleError
from torchslim.quantization.fusion import Fusion, find_fusions, fold_batchnorm
from torchslim.quantization.observers import Observer, choose_range
from torchslim.quantization.qdq import act_qparams
from torchslim.quantization.static_modules import QDQConv2d, QDQLinear, QuantGrid, RoundedOutput

__all__ = ["Calibration", "FusedFloat", "calibrate", "fuse", "renamed", "round_module_outputs", "set_module",
           "to_qdq"]

logger = logging.getLogger(__name__)


class FusedFloat(nn.Module):
    """A float layer with its BatchNorm folded in and its activation applied: the model that
    calibration observes and QAT trains."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, activation: str) -> None:
        super().__init__()
        self.layer, self.activation = layer, activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x)
        if self.activation == "relu":
            return F.relu(y)
        return F.relu6(y) if self.activation == "relu6" else y


def fuse(model: nn.Module, targets: Sequence[str], ignore: Sequence[str], who: str) -> dict[str, Fusion]:
    """Fold BatchNorms into the selected Conv2d/Linear layers, wrap each as ``FusedFloat``
    with its activation, and turn the absorbed BN / ReLU modules into ``nn.Identity``."""
    chosen = surgery.plain_layers(model, select(model, tuple(targets), tuple(ignore)),
                                  (nn.Conv2d, nn.Linear), who, fate="stay in float")
    if not chosen:
        raise UnsupportedModuleError(f"{who}: no plain Conv2d or Linear layer among the targets "
                                     f"{list(targets)} (ignore {list(ignore)}); nothing to quantize")
    fusions = find_fusions(model, list(chosen))
    modules = dict(model.named_modules())
    for fqn, fusion in fusions.items():
        layer = modules[fqn]
        assert isinstance(layer, nn.Conv2d | nn.Linear)
        if fusion.norm is not None:
            bn = modules[fusion.norm]
            assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
            w, b = fold_batchnorm(layer.weight, layer.bias, bn)
            folded = _with_bias(layer)
            with torch.no_grad():
                folded.weight.copy_(w)
                assert folded.bias is not None
                folded.bias.copy_(b)
            layer = folded
        set_module(model, fqn, FusedFloat(layer, fusion.activation).train(modules[fqn].training))
        for gone in fusion.absorbed():
            set_module(model, gone, nn.Identity())
    return fusions


@dataclasses.dataclass
class Calibration:
    """Per layer: the input and output grids and which of them the layer applies itself."""

    inputs: dict[str, QuantGrid]
    outputs: dict[str, QuantGrid]
    quantize_input: dict[str, bool]
    quantize_output: dict[str, bool]
    sources: dict[str, str]  # layer -> the layer (or rounded module) whose output grid its input reuses
    rounded: dict[str, QuantGrid] = dataclasses.field(default_factory=dict)  # module -> its output grid


@torch.no_grad()
def calibrate(model: nn.Module, fusions: dict[str, Fusion], batches: list[Any], observer: str,
              bits: int, percentile: float, device: torch.device | None = None,
              round_outputs: bool = False) -> Calibration:
    """Observe every fused layer's input and output over ``batches``; choose their grids.

    A layer whose input is exactly another fused layer's output (the same tensor) reuses that
    layer's output grid and does not round its input again. A layer whose input only picks
    values of the layer that ran just before it (max-pooling, flattening) reuses that grid too
    and rounds its input to it, which changes nothing in PyTorch and lets the exported graph
    stay in uint8 across those ops (``export.qdq_graph``). A layer whose output is the
    model's output keeps it in float. With ``round_outputs``, a layer whose input is the output
    of another module (a residual block's sum) has that module's output rounded to the layer's
    input grid (``Calibration.rounded``, applied by ``round_module_outputs``), so every reader of
    the sum sees the same int8 values. Two passes when the observer needs a histogram.
    """
    layers = {fqn: model.get_submodule(fqn) for fqn in fusions}
    obs_in = {fqn: Observer() for fqn in layers}
    obs_out = {fqn: Observer() for fqn in layers}
    producer: dict[int, str] = {}
    fed_by: dict[str, str | None] = {}
    picks_from: dict[str, str] = {}  # layer -> the layer just before it whose values its input picks
    last: list[tuple[str, torch.Tensor]] = []  # the latest layer to run on the first batch, its output
    keep: list[torch.Tensor] = []  # holds the first batch's tensors so their ids stay unique
    made_by: dict[int, list[str]] = {}  # first batch: output tensor id -> the other modules returning it
    calls: dict[str, int] = {}  # first batch: how often each other module ran
    others = _other_modules(model, layers) if round_outputs else {}

    def made(fqn: str, y: Any) -> None:
        calls[fqn] = calls.get(fqn, 0) + 1
        if isinstance(y, torch.Tensor):
            keep.append(y)
            made_by.setdefault(id(y), []).append(fqn)  # innermost first

    def run(pass_: str) -> None:
        for i, batch in enumerate(batches):
            first = i == 0
            with _hooks(layers, lambda fqn, args, y, first=first: see(fqn, args[0], y, pass_, first)), \
                    _hooks(others if pass_ == "range" and first else {}, lambda fqn, _args, y: made(fqn, y)):
                args, kwargs = model_call(model, to_device(batch, device) if device is not None else batch)
                out = model(*args, **kwargs)
            if pass_ == "range" and i == 0:
                final_ids.update(id(t) for t in _flat(out))
                for fqn in layers:
                    finals[fqn] = id_out[fqn] in final_ids

    id_out: dict[str, int] = {}
    id_in: dict[str, int] = {}
    finals: dict[str, bool] = {}
    final_ids: set[int] = set()

    def see(fqn: str, x: torch.Tensor, y: torch.Tensor, pass_: str, first: bool) -> None:
        if pass_ == "range":
            obs_in[fqn].see_range(x)
            obs_out[fqn].see_range(y)
            if first:
                keep.extend((x, y))
                fed_by[fqn] = producer.get(id(x))
                id_in[fqn] = id(x)
                if fed_by[fqn] is None and last and _picks_values(x, last[0][1]):
                    picks_from[fqn] = last[0][0]
                producer[id(y)] = fqn
                id_out[fqn] = id(y)
                last[:] = [(fqn, y)]
        else:
            obs_in[fqn].see_values(x)
            obs_out[fqn].see_values(y)

    model_training = model.training
    model.eval()
    try:
        run("range")
        if observer != "minmax":
            run("values")
    finally:
        model.train(model_training)
    wrapped = {}  # layer -> the innermost module run once that returns its input (a shared ReLU would
    for fqn in layers:  # round every one of its outputs, so the block holding it is wrapped instead)
        once = [m for m in made_by.get(id_in.get(fqn, -1), []) if calls[m] == 1]
        if once and fed_by.get(fqn) is None and fqn not in picks_from and id_in[fqn] not in final_ids:
            wrapped[fqn] = once[0]
    keep.clear()
    missing = [f for f in layers if obs_in[f].hi < obs_in[f].lo]
    if missing:
        raise UnsupportedModuleError(f"calibration never reached {missing}: those layers do not run "
                                     "in the model's forward on the calibration data")
    outputs = {}
    for fqn in layers:
        lo, hi = choose_range(obs_out[fqn], observer, bits, percentile)
        act = fusions[fqn].activation
        if act in ("relu", "relu6"):
            lo = 0.0
        if act == "relu6":
            hi = min(hi, 6.0)
        outputs[fqn] = QuantGrid(*act_qparams(lo, hi, bits), qmax=(1 << bits) - 1)
    inputs, quantize_input, sources = {}, {}, {}
    rounded: dict[str, QuantGrid] = {}
    for fqn in layers:
        source = fed_by.get(fqn)
        picked = picks_from.get(fqn)
        if fqn in wrapped:  # the producing module rounds its output to this layer's input grid
            module = wrapped[fqn]
            if module not in rounded:
                lo, hi = choose_range(obs_in[fqn], observer, bits, percentile)
                rounded[module] = QuantGrid(*act_qparams(lo, hi, bits), qmax=(1 << bits) - 1)
            inputs[fqn], quantize_input[fqn], sources[fqn] = rounded[module], False, module
        elif source is not None and not finals[source]:
            inputs[fqn], quantize_input[fqn], sources[fqn] = outputs[source], False, source
        elif picked is not None and not finals[picked]:
            inputs[fqn], quantize_input[fqn], sources[fqn] = outputs[picked], True, picked
        else:
            lo, hi = choose_range(obs_in[fqn], observer, bits, percentile)
            grid = QuantGrid(*act_qparams(lo, hi, bits), qmax=(1 << bits) - 1)
            inputs[fqn], quantize_input[fqn] = grid, True
    return Calibration(inputs, outputs, quantize_input, {f: not finals[f] for f in layers}, sources, rounded)


def round_module_outputs(model: nn.Module, cal: Calibration, activation_bits: int,
                         wrap: Callable[[nn.Module, QuantGrid], nn.Module] | None = None) -> dict[str, str]:
    """Wrap each module of ``cal.rounded`` (deepest first) in a ``RoundedOutput``, or in what
    ``wrap(module, grid)`` builds (a wrapper holding the module as ``inner``); returns the
    renames ``old prefix -> new prefix`` (``m.`` -> ``m.inner.``) in the order they apply."""
    renames = {}
    for fqn in sorted(cal.rounded, key=lambda f: -f.count(".")):
        module, grid = model.get_submodule(fqn), cal.rounded[fqn]
        wrapper = RoundedOutput.around(module, grid, activation_bits) if wrap is None else wrap(module, grid)
        set_module(model, fqn, wrapper)
        renames[f"{fqn}."] = f"{fqn}.inner."
    return renames


def renamed(fqn: str, renames: dict[str, str]) -> str:
    """``fqn`` after ``round_module_outputs``' wrappers moved it."""
    for old, new in renames.items():
        if fqn.startswith(old):
            fqn = new + fqn[len(old):]
    return fqn


def _other_modules(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Modules that are neither the root, a fused layer nor inside one."""
    inside = tuple(f"{f}." for f in layers)
    return {f: m for f, m in model.named_modules() if f and f not in layers and not f.startswith(inside)}


def to_qdq(model: nn.Module, fusions: dict[str, Fusion], cal: Calibration, weight_bits: int,
           activation_bits: int, weight_scales: dict[str, torch.Tensor] | None = None) -> tuple[str, ...]:
    """Swap every ``FusedFloat`` for its QDQ layer with the calibrated grids (and, if given,
    learned per-channel weight scales)."""

    def build(fqn: str, module: nn.Module) -> nn.Module:
        assert isinstance(module, FusedFloat)
        layer = module.layer
        quant: dict[str, Any] = {"activation": module.activation, "activation_bits": activation_bits,
                                 "quantize_input": cal.quantize_input[fqn],
                                 "quantize_output": cal.quantize_output[fqn]}
        new: QDQConv2d | QDQLinear = (QDQConv2d.like(layer, **quant) if isinstance(layer, nn.Conv2d)
                                      else QDQLinear.like(layer, **quant))
        new.set_quant(layer.weight, layer.bias, weight_bits, cal.inputs[fqn], cal.outputs[fqn],
                      None if weight_scales is None else weight_scales[fqn])
        return new.to(layer.weight.device).train(module.training)

    return surgery.replace_modules(model, [(f, model.get_submodule(f)) for f in fusions], build)


@contextmanager
def _hooks(modules: dict[str, nn.Module], see: Any) -> Iterator[None]:
    """Call ``see(fqn, args, output)`` after each of ``modules`` runs."""
    handles = [m.register_forward_hook(lambda _m, args, out, fqn=fqn: see(fqn, args, out))
               for fqn, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _picks_values(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether every value of ``x`` is a value of ``y`` (per batch, as after max-pooling or flattening)."""
    if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0] or x.numel() > y.numel():
        return False
    xs, ys = x.detach().flatten(), y.detach().flatten()
    if xs.numel() == 0 or xs.min() < ys.min() or xs.max() > ys.max():
        return False
    return bool(torch.isin(xs, ys).all())


def _flat(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flat(v)]
    if isinstance(out, tuple | list):
        return [t for v in out for t in _flat(v)]
    return []


def _with_bias(layer: nn.Conv2d | nn.Linear) -> nn.Conv2d | nn.Linear:
    """A copy of ``layer`` that has a bias (BN folding creates one)."""
    if isinstance(layer, nn.Conv2d):
        new: nn.Conv2d | nn.Linear = nn.Conv2d(
            layer.in_channels, layer.out_channels, layer.kernel_size,  # type: ignore[arg-type]
            layer.stride, layer.padding, layer.dilation,  # type: ignore[arg-type]
            layer.groups, bias=True, padding_mode=layer.padding_mode)
    else:
        new = nn.Linear(layer.in_features, layer.out_features, bias=True)
    return new.to(device=layer.weight.device, dtype=layer.weight.dtype).train(layer.training)


def set_module(model: nn.Module, fqn: str, module: nn.Module) -> None:
    """Put ``module`` at ``fqn`` in ``model``."""
    parent, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent), child, module)
