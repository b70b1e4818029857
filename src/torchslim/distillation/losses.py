"""Loss math shared by the distillation methods: pure functions of student and teacher tensors.

Every function treats the teacher as a constant (it is detached), so gradients reach the
student only. Every loss is exactly 0 when the student's tensors equal the teacher's.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from torchslim.errors import DataError

__all__ = [
    "attention_map",
    "attention_transfer_loss",
    "feature_loss",
    "masked_mean",
    "pairwise_distances",
    "relation_kl",
    "relation_log_probs",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "soft_target_loss",
]

FeatureLoss = Literal["mse", "cosine"]


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` over the positions where ``mask`` is True (all when None)."""
    if mask is None:
        return values.mean()
    mask = mask.to(torch.bool).expand_as(values)
    count = mask.sum()
    # An all-padding batch gives a zero still attached to the graph, not a NaN.
    return torch.where(mask, values, torch.zeros_like(values)).sum() / count.clamp(min=1)


def soft_target_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    *,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` averaged over rows.

    Rows are all leading dimensions: one per sample for a classifier, one per token for a
    sequence model. ``mask`` (the leading shape, True = counted) leaves out padding tokens.
    The ``T^2`` factor keeps gradient magnitudes comparable across temperatures (Hinton §2).
    """
    t = temperature
    kl = F.kl_div(
        F.log_softmax(student / t, dim=-1),
        F.log_softmax(teacher.detach() / t, dim=-1),
        log_target=True,
        reduction="none",
    ).sum(dim=-1)  # (..., C) -> (...): one KL per row
    return masked_mean(kl, mask) * t * t


def feature_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    kind: FeatureLoss,
    *,
    channel_dim: int = -1,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Distance between two equally shaped feature (or embedding) tensors.

    Args:
        student: Student features.
        teacher: Teacher features of the same shape.
        kind: ``mse`` (mean squared error) or ``cosine`` (``1 - cos`` along the channels).
        channel_dim: The channel dimension (1 for ``(B, C, H, W)`` maps).
        mask: Positions to count (the shape without the channel dimension); None counts all.
    """
    s = student.movedim(channel_dim, -1)  # (B, C, H, W) -> (B, H, W, C)
    t = teacher.detach().movedim(channel_dim, -1)
    if kind == "mse":
        per_position = (s - t).pow(2).mean(dim=-1)
    else:
        per_position = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)
    return masked_mean(per_position, mask)


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """Spatial attention of a feature map: ``mean_c F_c^2``, flattened, unit L2 norm.

    Zagoruyko & Komodakis 2017, eq. 1 with p = 2: ``(B, C, H, W) -> (B, H*W)``.
    """
    return F.normalize(features.pow(2).mean(dim=1).flatten(1), dim=1)


def attention_transfer_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Squared L2 distance between normalised attention maps, averaged over the batch.

    Channel counts may differ; the spatial sizes must agree.
    """
    if student.shape[0] != teacher.shape[0] or student.shape[2:] != teacher.shape[2:]:
        raise DataError(
            f"attention maps need equal batch and spatial sizes: student features "
            f"{tuple(student.shape)}, teacher features {tuple(teacher.shape)}; pick layers of equal "
            "resolution"
        )
    diff = attention_map(student) - attention_map(teacher.detach())
    return diff.pow(2).sum(dim=1).mean()


def relation_log_probs(
    left: torch.Tensor,
    right: torch.Tensor,
    heads: int,
    *,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log of ``softmax(L_r R_r^T / sqrt(d_r))`` for ``heads`` relation heads (MiniLM).

    ``left`` ``(B, T, E)`` and ``right`` ``(B, S, E)`` are split into ``heads`` chunks of
    ``E / heads`` channels. With ``heads`` equal to the model's head count and
    ``left, right = Q, K`` this is the model's attention distribution; choosing the same
    ``heads`` for teacher and student makes relations comparable when their head counts
    differ (MiniLM-v2 relation heads).

    Args:
        left: Queries (or values for value relations).
        right: Keys (or values).
        heads: Relation heads; must divide ``E``.
        allowed: Boolean, broadcastable to ``(B, T, S)``: which keys each query may see
            (False for padding and, in causal models, later positions).

    Returns:
        ``(B, heads, T, S)`` log-probabilities.
    """
    b, t, e = left.shape
    s = right.shape[1]
    if e % heads or right.shape[-1] != e:
        raise DataError(f"relation heads: {heads} heads must divide the hidden size of both inputs; "
                        f"found widths {e} and {right.shape[-1]}")
    d = e // heads
    q = left.reshape(b, t, heads, d).transpose(1, 2)  # (B, T, E) -> (B, R, T, d)
    k = right.reshape(b, s, heads, d).transpose(1, 2)  # (B, S, E) -> (B, R, S, d)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # (B, R, T, S)
    if allowed is not None:
        blocked = ~allowed.to(torch.bool).expand(b, t, s)[:, None]  # (B, 1, T, S)
        scores = scores.masked_fill(blocked, torch.finfo(scores.dtype).min)
    return F.log_softmax(scores, dim=-1)


def relation_kl(
    student: torch.Tensor, teacher: torch.Tensor, *, query_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``KL(teacher || student)`` of ``(B, R, T, S)`` relation log-probs, mean over heads and rows.

    ``query_mask`` ``(B, T)`` leaves padding rows out.
    """
    kl = F.kl_div(student, teacher.detach(), log_target=True, reduction="none").sum(dim=-1)
    per_row = kl.mean(dim=1)  # (B, R, T) -> (B, T)
    return masked_mean(per_row, query_mask)


def pairwise_distances(embeddings: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances ``(B, D) -> (B, B)`` with a zero diagonal and finite gradients."""
    squared = embeddings.pow(2).sum(dim=1)
    gram = embeddings @ embeddings.t()  # (B, D) @ (D, B) -> (B, B)
    dist = (squared[:, None] + squared[None, :] - 2 * gram).clamp(min=eps).sqrt()
    eye = torch.eye(len(embeddings), dtype=torch.bool, device=embeddings.device)
    return dist.masked_fill(eye, 0.0)


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Distance-wise RKD: Huber loss between mean-normalised pairwise distances (Park §3.2.1).

    Inputs are ``(B, ...)`` and flattened per sample; widths may differ. Dividing by the
    mean distance makes the loss invariant to the scale of either embedding.
    """
    s, t = student.flatten(1), teacher.detach().flatten(1)
    if len(s) < 2:
        return student.sum() * 0.0
    off = ~torch.eye(len(s), dtype=torch.bool, device=s.device)
    ds, dt = pairwise_distances(s)[off], pairwise_distances(t)[off]
    ds = ds / ds.mean().clamp(min=1e-12)
    dt = dt / dt.mean().clamp(min=1e-12)
    return F.smooth_l1_loss(ds, dt)


def _angles(embeddings: torch.Tensor) -> torch.Tensor:
    # diff[i, j] = e_j - e_i, unit length: (B, D) -> (B, B, D)
    diff = F.normalize(embeddings.unsqueeze(0) - embeddings.unsqueeze(1), p=2, dim=2)
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()  # cos of angle j-i-k: (B, B, B)


def rkd_angle_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Angle-wise RKD: Huber loss between the cosines of all triplet angles (Park §3.2.2).

    Memory grows as ``B^2 * D``; angles are invariant to scale by construction.
    """
    s, t = student.flatten(1), teacher.detach().flatten(1)
    if len(s) < 3:
        return student.sum() * 0.0
    return F.smooth_l1_loss(_angles(s), _angles(t))
