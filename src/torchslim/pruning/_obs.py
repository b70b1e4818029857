"""Optimal Brain Surgeon math for one-shot pruning of a linear layer (SparseGPT).

Given a layer's weight ``W`` (out, in) and the Hessian ``H = 2 X^T X / n`` of its squared output
error over calibration inputs ``X`` (n, in), columns are pruned left to right in blocks: a mask
is chosen per block from the OBS saliency ``w^2 / [H^-1]_jj^2``, and each removed weight's error
is spread over the not yet processed columns of its row through the upper Cholesky factor of
``H^-1`` (Frantar & Alistarh 2023, Algorithm 1). Rows are independent, so the whole matrix is
updated at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from torchslim.core.hessian import inverse_hessian_factor

__all__ = ["sparsegpt_prune"]


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
    damping: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` (out, in) with OBS updates; return ``(new_weight, keep_mask)``.

    Args:
        weight: The layer's weight; not modified.
        hessian: ``2 X^T X / n`` of the layer's inputs, (in, in).
        sparsity: Share of each column block set to zero (unstructured); exact per block.
        nm: ``(N, M)``: keep N of every M consecutive inputs of each row instead.
        block_size: Columns processed together (the lazy-batch size of the paper); must be a
            multiple of M for N:M.
        damping: Added to the Hessian diagonal, relative to its mean.

    Returns:
        The updated weight in the input's dtype, zero where the mask is False.
    """
    # Work on W^T (in, out): column j of W is the contiguous row j, which makes the per-column
    # rank-1 updates below several times faster on CPU.
    wt = weight.detach().float().t().contiguous()  # (in, out)
    h = hessian.detach().float().clone().to(wt.device)  # (in, in)
    dead = h.diagonal() == 0  # inputs never active: their weights cannot matter on this data
    h[dead, dead] = 1.0
    wt[dead] = 0.0
    with _one_thread(h):  # LAPACK's cholesky_inverse is many times slower multi-threaded here
        hinv = inverse_hessian_factor(h, damping, "SparseGPT").float().to(wt.device)
    keep = torch.ones_like(wt, dtype=torch.bool)
    cols = wt.shape[0]
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        with _one_thread(wt):
            keep[start:end], err = _prune_block(wt[start:end], hinv[start:end, start:end], sparsity, nm)
        wt[end:] -= hinv[start:end, end:].T @ err  # (rest, b) @ (b, out): lazy update of later columns
    return (wt * keep).t().contiguous().to(weight.dtype), keep.t().contiguous()


def _prune_block(wt: torch.Tensor, hinv: torch.Tensor, sparsity: float,
                 nm: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune one block of columns of ``W^T`` (b, out) in place; return (keep mask, scaled errors)."""
    d = hinv.diagonal()  # (b,)
    keep = _block_mask(wt, d, sparsity) if nm is None else torch.ones_like(wt, dtype=torch.bool)
    err = torch.zeros_like(wt)
    for i in range(wt.shape[0]):
        if nm is not None and i % nm[1] == 0:
            keep[i:i + nm[1]] = _nm_keep(wt[i:i + nm[1]], d[i:i + nm[1]], nm[0])
        e = wt[i] * ~keep[i] / d[i]  # (out,): error of the removed weights, scaled by 1/[H^-1]_ii
        wt[i:].addr_(hinv[i, i:], e, alpha=-1)  # OBS update of this and the later columns in the block
        wt[i].mul_(keep[i])  # exactly zero where pruned (the update gives it up to rounding)
        err[i] = e
    return keep, err


@contextlib.contextmanager
def _one_thread(t: torch.Tensor) -> Iterator[None]:
    """Run small CPU kernels single-threaded.

    The per-column operations touch one block of rows; splitting each across threads costs
    more in synchronisation than it saves, badly so on a busy machine (milliseconds instead of
    microseconds per column). The same holds for ``cholesky_inverse`` at these sizes.
    """
    before = torch.get_num_threads()
    if t.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _block_mask(wt: torch.Tensor, d: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep mask dropping exactly ``int(numel * sparsity)`` entries of lowest ``w^2 / d^2``."""
    scores = (wt.pow(2) / d.pow(2)[:, None]).flatten()
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=wt.device)
    n_zero = int(scores.numel() * sparsity)
    if n_zero:
        keep[scores.argsort(stable=True)[:n_zero]] = False
    return keep.view_as(wt)


def _nm_keep(wt: torch.Tensor, d: torch.Tensor, n: int) -> torch.Tensor:
    """Keep mask of the ``n`` highest ``w^2 / d^2`` of each output over an (M, out) slice."""
    scores = wt.pow(2) / d.pow(2)[:, None]
    keep = torch.zeros_like(wt, dtype=torch.bool)
    keep.scatter_(0, scores.topk(n, dim=0).indices, True)
    return keep
