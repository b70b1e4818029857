"""The inverse-Hessian factor that second-order one-shot methods (SparseGPT, GPTQ) share."""

from __future__ import annotations

import logging

import torch

from torchslim.errors import DataError

__all__ = ["inverse_hessian_factor"]

logger = logging.getLogger(__name__)

_MAX_DAMPING_TRIES = 6


@torch.no_grad()
def inverse_hessian_factor(hessian: torch.Tensor, damping: float, who: str = "") -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damping * mean(diag H) * I)^-1`` (``U^T U = H^-1``), float64.

    If the damped Hessian is still not positive definite, the damping is raised tenfold (with
    a warning naming ``who``) up to a few times.

    Raises:
        DataError: the Hessian stays singular (non-finite calibration inputs).
    """
    h = hessian.double()
    scale = float(h.diagonal().mean()) or 1.0
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    step = damping
    for _ in range(_MAX_DAMPING_TRIES):
        lower, info = torch.linalg.cholesky_ex(h + step * scale * eye)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if int(info) == 0:
                factor: torch.Tensor = upper
                return factor
        logger.warning("%s: Hessian not positive definite with damping %.3g; trying %.3g",
                       who, step, step * 10)
        step *= 10
    raise DataError(f"{who}: the Hessian {tuple(h.shape)} of a layer's inputs stays singular even with "
                    f"damping {step:.3g}; expected finite calibration inputs")
