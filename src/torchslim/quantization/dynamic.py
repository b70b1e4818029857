"""Dynamic int8 quantization of Linear layers, run with real int8 kernels.

References: Jacob et al. 2018, https://arxiv.org/abs/1712.05877 (integer-arithmetic inference);
Dettmers et al. 2022, https://arxiv.org/abs/2208.07339 (vector-wise int8 matmul scales).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar

import torch
from torch import nn

from torchslim.core import (
    Context,
    HookSet,
    MethodConfig,
    Outcome,
    calibration_inputs,
    check,
    register,
    select,
    surgery,
)
from torchslim.core.context import to_device
from torchslim.core.layerwise import run_batches
from torchslim.quantization._act_fusion import find_activations
from torchslim.quantization.modules import DynamicQuantLinear

__all__ = ["DynamicQuantizationConfig", "apply"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DynamicQuantizationConfig(MethodConfig):
    """Store Linear weights in int8 and quantize activations on the fly, per row, at each call.

    Papers: Jacob et al., "Quantization and Training of Neural Networks for Efficient
    Integer-Arithmetic-Only Inference", CVPR 2018, https://arxiv.org/abs/1712.05877;
    Dettmers et al., "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale",
    NeurIPS 2022, https://arxiv.org/abs/2208.07339 (the vector-wise scales used here,
    without the outlier decomposition); Xiao et al., "SmoothQuant: Accurate and Efficient
    Post-Training Quantization for Large Language Models", ICML 2023,
    https://arxiv.org/abs/2211.10438 (``smooth``).

    Args:
        weight_bits: Bits per weight; 8 is the width that runs on real int8 kernels.
        activation_bits: Bits per activation; 8 as well.
        per_channel: One weight scale per output channel; False uses one per layer.
        smooth: SmoothQuant's migration strength alpha in [0, 1], or null (off). Needs
            calibration data: input channel ``j`` of each layer is divided by
            ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` and weight column ``j`` multiplied
            by it, so outlier channels of the activations no longer set every row's scale.
        batches: Calibration batches read for ``smooth``.
        activation_scale: ``row``: one scale per input row (token), the accurate default;
            ``tensor``: one per call, applied with the weight scales and the bias inside
            the int8 GEMM, which leaves nothing to do on the output (faster, coarser). In
            eager inference on x86 CPUs with VNNI the whole layer is then one fbgemm call
            that rounds the input while packing it; elsewhere oneDNN's GEMM with the scales
            fused (``torch._int_mm`` without VNNI, where u8 x s8 kernels can saturate).
        fuse_activations: Let each layer whose output only feeds a GELU or ReLU module apply
            that activation itself (the module becomes ``nn.Identity``); with
            ``activation_scale: tensor`` oneDNN applies it inside the GEMM. The pairs are found
            by running the model once on the first calibration batch (else
            ``ctx.example_inputs``; with neither, nothing is fused) and kept only where the
            float model's outputs stay the same.
        targets: Layer selectors: an fqn, ``re:<regex>`` or ``type:<ClassName>``.
        ignore: Selectors removed from ``targets``.

    Recipe:
        - method: quantization.dynamic
          per_channel: true
          ignore: ["re:.*classifier.*"]
        - method: quantization.dynamic   # or: smoothed on calibration data, closer to fp32
          smooth: 0.7
        - method: quantization.dynamic   # or: fastest; GELU / ReLU run inside the int8 GEMM
          activation_scale: tensor
          fuse_activations: true

    Notes:
        Needs no calibration data (``smooth`` does; ``fuse_activations`` uses one batch when
        there is one). Weights are symmetric int8 (``scale = max|w| / 127``).
        Each input row (a sample, or a token of a sequence) is quantized with its own
        symmetric scale when the layer runs; more accurate than one scale per batch at a
        negligible cost. The product is a true int8 x int8 -> int32 GEMM
        (``torch._int_mm``, oneDNN with VNNI where the CPU has it), rescaled to float.
        Measured on an AVX-512 CPU: about 2.5x faster than fp32 for 1024 tokens x
        384 -> 1536 (two threads), about 7x for 8 rows x 2048 -> 2048 (one thread; layers
        of 2**20 weights or more keep a oneDNN-packed copy of the weight in memory for
        that), and no gain for a few rows through a small layer, where quantizing the input
        costs as much as the product.
        ONNX export writes ``MatMulInteger`` nodes that ONNX Runtime runs with its u8 x s8
        kernels and whose outputs match PyTorch's. Only plain ``nn.Linear`` layers are
        converted; other selected modules (convolutions, the ``out_proj`` that
        ``nn.MultiheadAttention`` reads directly, layers with tied weights) stay float and
        are listed in a warning. For 4-bit or 3-bit weights use ``quantization.weight_only``.
        With ``smooth`` each layer multiplies its input by ``1 / s`` before rounding it (one
        elementwise product, exported to ONNX as ``Mul``); on all-MiniLM-L6-v2, alpha 0.7
        raised the embeddings' mean cosine to fp32 from 0.9968 to 0.9987 and the smallest
        cosine between ONNX Runtime's and PyTorch's embeddings from 0.9968 to 0.9996.
    """

    name: ClassVar[str] = "quantization.dynamic"
    weight_bits: int = 8
    activation_bits: int = 8
    per_channel: bool = True
    smooth: float | None = None
    batches: int = 8
    activation_scale: str = "row"
    fuse_activations: bool = True
    targets: tuple[str, ...] = ("type:Linear",)
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for field in ("weight_bits", "activation_bits"):
            _check_bits(field, getattr(self, field))
        if self.smooth is not None:
            check(0.0 <= self.smooth <= 1.0,
                  f"quantization.dynamic: smooth must be in [0, 1] (or null); found {self.smooth!r}")
        check(self.batches >= 1, f"quantization.dynamic: batches must be >= 1; found {self.batches!r}")
        check(self.activation_scale in ("row", "tensor"),
              "quantization.dynamic: activation_scale must be 'row' or 'tensor'; "
              f"found {self.activation_scale!r}")


def _check_bits(field: str, bits: object) -> None:
    check(isinstance(bits, int) and not isinstance(bits, bool) and 1 <= bits <= 8,
          f"quantization.dynamic: {field} must be an integer in 1..8, found {bits!r}")
    check(bits == 8,
          f"quantization.dynamic: {field}={bits} is not supported; this method runs 8 bits on real "
          "int8 kernels (use 8), and quantization.weight_only stores weights in fewer bits")


@register(DynamicQuantizationConfig)
def apply(model: nn.Module, cfg: DynamicQuantizationConfig, ctx: Context) -> Outcome:
    """Replace every selected ``nn.Linear`` with a ``DynamicQuantLinear``."""
    tied = {name for group in surgery.shared_parameters(model) for name in group}
    skipped: dict[str, str] = {}
    matches = select(model, cfg.targets, cfg.ignore)
    smooth = {} if cfg.smooth is None else _smoothing(model, matches, cfg.smooth, ctx, cfg.batches)
    fused = _activations(model, matches, tied, ctx) if cfg.fuse_activations else {}

    def build(fqn: str, module: nn.Module) -> nn.Module | None:
        reason = _why_not(fqn, module, tied)
        if reason is not None:
            skipped[fqn] = reason
            return None
        assert isinstance(module, nn.Linear)  # _why_not checked the type
        new = DynamicQuantLinear.from_linear(module, per_channel=cfg.per_channel, smooth=smooth.get(fqn),
                                             per_tensor=cfg.activation_scale == "tensor",
                                             activation=fused[fqn][0] if fqn in fused else "none")
        return new.train(module.training)

    replaced = surgery.replace_modules(model, matches, build)
    absorbed = surgery.replace_modules(
        model, [(act, model.get_submodule(act)) for f, (_name, act) in fused.items() if f in replaced],
        lambda _fqn, _m: nn.Identity())
    if skipped:
        listed = "; ".join(f"{fqn} ({why})" for fqn, why in skipped.items())
        logger.warning("quantization.dynamic: %d selected module(s) stay float: %s", len(skipped), listed)
    stats: dict[str, float] = {"int8_layers": len(replaced), "fused_activations": len(absorbed)}
    if cfg.smooth is not None:
        stats["smoothed_layers"] = len(set(replaced) & set(smooth))
    layers: dict[str, dict[str, Any]] = {fqn: {"bits": 8} for fqn in replaced}
    for fqn in replaced:
        if fqn in fused:
            layers[fqn]["activation"] = fused[fqn][0]
    return Outcome(model=model, touched=replaced, structure={fqn: {} for fqn in (*replaced, *absorbed)},
                   stats=stats, layers=layers)


def _activations(model: nn.Module, matches: list[tuple[str, nn.Module]], tied: set[str],
                 ctx: Context) -> dict[str, tuple[str, str]]:
    """``find_activations`` for the layers that will be converted, on the first calibration batch
    (else ``ctx.example_inputs``); empty without either."""
    device = next(model.parameters(), torch.empty(0)).device
    if ctx.calib_data is not None or ctx.train_data is not None:
        batch = calibration_inputs(ctx, 1, "quantization.dynamic (fuse_activations)", device)[0]
    elif ctx.example_inputs is not None:
        batch = to_device(ctx.example_inputs, device)
    else:
        logger.info("quantization.dynamic: no calibration batch or example inputs; activations stay separate")
        return {}
    linears = {fqn: m for fqn, m in matches if _why_not(fqn, m, tied) is None}
    return find_activations(model, linears, batch)


def _smoothing(model: nn.Module, matches: list[tuple[str, nn.Module]], alpha: float, ctx: Context,
               batches: int) -> dict[str, torch.Tensor]:
    """SmoothQuant's per-input-channel factors ``s`` of each plain Linear, from calibration maxima."""
    linears = {f: m for f, m in matches if type(m) is nn.Linear}
    amax: dict[str, torch.Tensor] = {}

    def observe(fqn: str) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).float()
            amax[fqn] = x if fqn not in amax else torch.maximum(amax[fqn], x)
        return hook

    with HookSet() as hooks, torch.no_grad():
        for fqn, module in linears.items():
            hooks.forward_pre(module, observe(fqn))
        run_batches(model, calibration_inputs(ctx, batches, "quantization.dynamic (smooth)"))
    factors = {}
    for fqn, x_max in amax.items():
        w_max = linears[fqn].weight.detach().abs().amax(dim=0).float().to(x_max.device)
        s = x_max.clamp_min(1e-5).pow(alpha) / w_max.clamp_min(1e-5).pow(1 - alpha)
        factors[fqn] = torch.where((x_max > 0) & (w_max > 0), s, torch.ones_like(s))
    return factors


def _why_not(fqn: str, module: nn.Module, tied: set[str]) -> str | None:
    """Why ``module`` cannot be converted, or None if it can."""
    if type(module) is not nn.Linear:
        if isinstance(module, nn.Linear):  # e.g. MultiheadAttention.out_proj, read by its parent
            return f"{type(module).__name__} is a Linear subclass whose weight its owner may read"
        return f"{type(module).__name__} is not an nn.Linear"
    if f"{fqn}.weight" in tied:
        return "its weight is tied to another layer; int8 would untie and duplicate it"
    return None
