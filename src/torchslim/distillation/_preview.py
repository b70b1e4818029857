"""Preview grid and file of synthetic samples (data-free distillation), written atomically."""

from __future__ import annotations

import importlib.util
import io
import logging
import os
import tempfile
from pathlib import Path

import torch

__all__ = ["save_samples"]

logger = logging.getLogger(__name__)


def _atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    Path(name).replace(path)


def preview_png(inputs: torch.Tensor, labels: torch.Tensor, title: str, n: int = 64) -> bytes:
    """An 8-column grid of the first ``n`` images (first channel), titled with their labels;
    ``(N, F)`` vectors are drawn as one heat-map row each."""
    from matplotlib.figure import Figure

    x, y = inputs[:n].detach().float().cpu(), labels[:n].cpu()
    if x.dim() == 2:
        fig = Figure(figsize=(6, 4), dpi=100, layout="constrained")
        ax = fig.add_subplot()
        ax.imshow(x.numpy(), aspect="auto", cmap="viridis")
        ax.set_xlabel("feature")
        ax.set_ylabel("sample")
        ax.set_title(title, fontsize=10)
    else:
        cols = 8
        rows = (len(x) + cols - 1) // cols
        fig = Figure(figsize=(cols * 1.0, rows * 1.1 + 0.4), dpi=100, layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False)
        for i, ax in enumerate(axes.flat):
            ax.axis("off")
            if i < len(x):
                ax.imshow(x[i, 0].numpy(), cmap="gray")
                ax.set_title(str(int(y[i])), fontsize=8)
        fig.suptitle(title, fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def save_samples(workdir: Path, stem: str, inputs: torch.Tensor, labels: torch.Tensor, title: str) -> Path:
    """Write ``workdir/<stem>.safetensors`` (``inputs``, ``labels``) and ``workdir/plots/<stem>.png``.

    The PNG is skipped (with a warning) when matplotlib is not installed. Returns the tensor file.
    """
    from safetensors.torch import save

    path = Path(workdir) / f"{stem}.safetensors"
    _atomic(path, save({"inputs": inputs.detach().cpu().contiguous(), "labels": labels.cpu().contiguous()}))
    if importlib.util.find_spec("matplotlib") is None:
        logger.warning("matplotlib is not installed: no preview of the synthetic samples")
    else:
        _atomic(Path(workdir) / "plots" / f"{stem}.png", preview_png(inputs, labels, title))
    return path
