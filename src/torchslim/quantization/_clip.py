"""Per-group clipping search: shrink each group's range where rounding the outliers costs less
output error than the coarser grid the full range gives every other weight.

The error of a candidate is measured on the layer's output over the calibration inputs through
the group's block of the input Gram matrix ``H = X^T X``: ``e_g H_gg e_g^T`` for the rounding
error ``e_g`` of one row's group (cross terms between groups are left out, as in AWQ's clip
search, which scores sampled outputs directly).
"""

from __future__ import annotations

import torch

from torchslim.quantization.packed import dequantize_groups, quantize_groups

__all__ = ["CLIP_STEPS", "search_clip"]

CLIP_STEPS = 20  # equal steps from 1 down to 1 - shrink: 21 factors tried


@torch.no_grad()
def search_clip(weight: torch.Tensor, gram: torch.Tensor, *, bits: int, group_size: int, symmetric: bool,
                shrink: float, steps: int = CLIP_STEPS) -> torch.Tensor:
    """The factor in [1 - shrink, 1] per row and group, (out, in / group_size), whose rounding
    of ``weight`` (out, in) gives the least output error under ``gram`` (in, in)."""
    w = weight.detach().float()
    out_f, in_f = w.shape
    groups = in_f // group_size
    h = gram.detach().float()
    blocks = torch.stack([h[g * group_size:(g + 1) * group_size, g * group_size:(g + 1) * group_size]
                          for g in range(groups)])  # (groups, size, size)
    best = torch.ones(out_f, groups, device=w.device)
    least = torch.full((out_f, groups), float("inf"), device=w.device)
    for i in range(steps + 1):
        factor = 1.0 - shrink * i / steps
        clip = torch.full((out_f, groups), factor, device=w.device)
        e = (dequantize_groups(*quantize_groups(w, bits, group_size, symmetric, clip)) - w)
        e = e.reshape(out_f, groups, group_size)
        err = torch.einsum("ogi,gij,ogj->og", e, blocks, e)
        better = err < least
        least = torch.where(better, err, least)
        best = torch.where(better, torch.full_like(best, factor), best)
    return best
