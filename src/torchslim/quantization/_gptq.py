"""GPTQ's column-by-column quantization with Hessian-based error compensation, for one layer.

Frantar et al. 2023 (https://arxiv.org/abs/2210.17323): columns are quantized in blocks; each
column's rounding error, divided by the matching diagonal entry of the upper Cholesky factor
of ``H^-1``, is spread over the columns not yet quantized, so the layer's output error on the
calibration inputs (``H = 2 X^T X / n``) stays small. With activation ordering the columns go
in order of decreasing ``diag(H)``; group scales are then fixed beforehand from the original
weight ("static groups"), so every group keeps contiguous columns and the packed layout.
"""

from __future__ import annotations

import math

import torch

from torchslim.core.hessian import inverse_hessian_factor
from torchslim.quantization._clip import search_clip
from torchslim.quantization.packed import dequantize_groups, quantize_groups

__all__ = ["gptq_quantize", "output_error", "search_scales"]


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, *, bits: int, group_size: int,
                  symmetric: bool = False, act_order: bool = True, damping: float = 0.01,
                  block_size: int = 128,
                  clip_shrink: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (out, in) uint8, scales and zero points (out, in / group_size) for ``weight``; with
    ``clip_shrink`` each group's range is shrunk where that lowers its own output error
    (``search_clip``), and the layer keeps the clipped result only if the whole layer's output
    error (``output_error``) is lower than with full ranges: the columns GPTQ updates later may
    leave a clipped range, so a group-wise gain does not always carry over."""
    plain = _gptq(weight, hessian, bits=bits, group_size=group_size, symmetric=symmetric, act_order=act_order,
                  damping=damping, block_size=block_size, clip_shrink=0.0)
    if not clip_shrink:
        return plain
    clipped = _gptq(weight, hessian, bits=bits, group_size=group_size, symmetric=symmetric,
                    act_order=act_order, damping=damping, block_size=block_size, clip_shrink=clip_shrink)
    return min(plain, clipped, key=lambda result: output_error(weight, hessian, *result))


@torch.no_grad()
def search_scales(weight: torch.Tensor, hessian: torch.Tensor, *, bits: int, group_size: int, symmetric: bool,
                  grid: int) -> torch.Tensor:
    """AWQ's activation-aware column scales ``s = rms(x)^alpha`` (in,), ``alpha`` from ``grid`` points
    in [0, 1) with the least output error ``tr(E H E^T)`` of rounding ``W * s`` (then dividing by
    ``s``); the input RMS and the error both come from the Hessian ``H = 2 X^T X / n``, so no
    activation sample is kept. ``alpha = 0`` (all ones) is among the candidates."""
    w = weight.detach().double()
    h = hessian.detach().double()
    rms = h.diagonal().clamp_min(0).sqrt().clamp_min(1e-8)
    best, least = torch.ones_like(rms), math.inf
    for i in range(grid):
        s = rms.pow(i / grid)
        s = s / (s.max() * s.min()).sqrt()
        rounded = dequantize_groups(*quantize_groups(w * s, bits, group_size, symmetric)).double() / s
        err = _weighted(rounded - w, h)
        if err < least:
            best, least = s, err
    return best.float()


def output_error(weight: torch.Tensor, hessian: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                 zero: torch.Tensor) -> float:
    """``tr(E H E^T)`` for the rounding error ``E`` of ``codes``: the layer's summed squared output
    error over the calibration inputs (up to the Hessian's scale)."""
    e = dequantize_groups(codes, scale, zero).double() - weight.detach().double()
    return _weighted(e, hessian.double())


def _weighted(e: torch.Tensor, h: torch.Tensor) -> float:
    """``tr(E H E^T)``: the summed squared output error of the weight error ``E`` (out, in)."""
    return float(((e @ h) * e).sum())


def _gptq(weight: torch.Tensor, hessian: torch.Tensor, *, bits: int, group_size: int, symmetric: bool,
          act_order: bool, damping: float, block_size: int,
          clip_shrink: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    w = weight.detach().double().clone()
    h = hessian.detach().double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    n_in = w.shape[1]

    def grid(part: torch.Tensor, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        clip = search_clip(part, gram, bits=bits, group_size=group_size, symmetric=symmetric,
                           shrink=clip_shrink) if clip_shrink else None
        _, s, z = quantize_groups(part, bits, group_size, symmetric, clip)
        return s, z

    scale, zero = grid(w, h)  # static groups
    scale, zero = scale.double(), zero.double()
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(n_in)
    w, h = w[:, perm], h[perm][:, perm]
    hinv = inverse_hessian_factor(h, damping, "GPTQ")
    codes = torch.zeros_like(w)
    top = 2**bits - 1
    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        block, errors = w[:, i1:i2].clone(), torch.zeros(w.shape[0], i2 - i1, dtype=w.dtype)
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            if not act_order and col % group_size == 0:  # dynamic groups follow the updated weight
                s, z = grid(torch.cat([block[:, i:], w[:, i2:]], 1)[:, :group_size],
                            h[i1 + i:i1 + i + group_size, i1 + i:i1 + i + group_size])
                scale[:, col // group_size], zero[:, col // group_size] = s[:, 0].double(), z[:, 0].double()
            g = col // group_size
            q = torch.clamp(torch.round(block[:, i] / scale[:, g]) + zero[:, g], 0, top)
            codes[:, i1 + i] = q
            err = (block[:, i] - (q - zero[:, g]) * scale[:, g]) / hinv[i1 + i, i1 + i]
            block[:, i:] -= err[:, None] * hinv[i1 + i, i1 + i:i2][None, :]
            errors[:, i] = err
        w[:, i2:] -= errors @ hinv[i1:i2, i2:]
    out = torch.empty_like(codes)
    out[:, perm] = codes
    return out.to(torch.uint8), scale.float(), zero.float()
