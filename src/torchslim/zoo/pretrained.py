"""The bundled pretrained FashionCNN: trained on first use, then cached as safetensors.

The cache file is keyed by the seed and a hash of the architecture and training settings,
so changing either trains a new model. It is written atomically (temporary file, then
rename), so concurrent processes never see a half-written file, and read with safetensors
only (no pickle). Its metadata holds the measured test accuracy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from torchslim.errors import DataError
from torchslim.zoo.data import accuracy, head, load_data
from torchslim.zoo.models import FashionCNN

__all__ = [
    "ACCURACY_KEY",
    "DEFAULT_SETTINGS",
    "QUICK_SETTINGS",
    "TrainSettings",
    "cache_dir",
    "pretrained_fashion_cnn",
    "pretrained_path",
    "read_metadata",
]

logger = logging.getLogger(__name__)

_FORMAT = 1  # bump when FashionCNN.forward or the training procedure changes meaning
_IMAGE_SIZES = {"fashion_mnist": 28, "digits": 8}
ACCURACY_KEY = "torchslim.test_accuracy"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """How the pretrained model is trained; every field is part of the cache key.

    Args:
        data: Registered data set name (``fashion_mnist`` or ``digits``).
        epochs: Passes over the training data.
        lr: Peak learning rate (cosine schedule with warm-up).
        batch_size: Training batch size.
        weight_decay: Adam L2 penalty.
        train_limit: Train on the first ``train_limit`` samples only (fast tests).
    """

    data: str = "fashion_mnist"
    epochs: int = 4
    lr: float = 2e-3
    batch_size: int = 128
    weight_decay: float = 0.0
    train_limit: int | None = None

    def __post_init__(self) -> None:
        if self.data not in _IMAGE_SIZES:
            raise DataError(f"TrainSettings.data: expected one of {sorted(_IMAGE_SIZES)}, "
                            f"found {self.data!r}")


DEFAULT_SETTINGS = TrainSettings()
QUICK_SETTINGS = TrainSettings(epochs=1, train_limit=12_000)  # ~10 s; for smoke runs (demo --quick)


def cache_dir() -> Path:
    """``$TORCHSLIM_CACHE``, else ``$XDG_CACHE_HOME/torchslim``, else ``~/.cache/torchslim``."""
    if explicit := os.environ.get("TORCHSLIM_CACHE"):
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "torchslim"


def _build(settings: TrainSettings, seed: int = 0) -> FashionCNN:
    with torch.random.fork_rng(devices=[]):  # seeded init; the caller's global RNG is left alone
        torch.manual_seed(seed)
        return FashionCNN(image_size=_IMAGE_SIZES[settings.data])


def pretrained_path(seed: int = 0, settings: TrainSettings = DEFAULT_SETTINGS) -> Path:
    """Where the weights for ``(seed, settings)`` are cached (the file may not exist yet)."""
    key = json.dumps({"format": _FORMAT, "arch": repr(_build(settings)),
                      "settings": dataclasses.asdict(settings)}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / f"fashion_cnn-{settings.data}-seed{seed}-{digest}.safetensors"


def read_metadata(path: Path) -> dict[str, str]:
    """The safetensors metadata of a cached model (``torchslim.test_accuracy`` and more)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def pretrained_fashion_cnn(seed: int = 0, *, progress: bool = False,
                           settings: TrainSettings = DEFAULT_SETTINGS) -> nn.Module:
    """A trained ``FashionCNN`` in eval mode: loaded from the cache, or trained and cached.

    With the default settings the first call trains on the full Fashion-MNIST train split
    (about 3 minutes on 2 idle CPU cores) and reaches 92.7% test accuracy (seed 0).

    Args:
        seed: Seed of the initialisation and the data order.
        progress: Show a progress bar while training.
        settings: Training settings; part of the cache key.
    """
    path = pretrained_path(seed, settings)
    model: nn.Module = _build(settings)
    if path.is_file() and _load(path, model):
        logger.info("loaded pretrained FashionCNN from %s", path)
        return model.eval()
    logger.info("training FashionCNN on %s (seed %d, %s); it is cached in %s",
                settings.data, seed, settings, path)
    started = time.perf_counter()
    model = _train(seed, settings, progress)
    seconds = time.perf_counter() - started
    test_acc = accuracy(model, load_data(settings.data, "test"))
    logger.info("trained FashionCNN in %.0f s: test accuracy %.4f", seconds, test_acc)
    metadata = {ACCURACY_KEY: f"{test_acc:.6f}", "torchslim.train_seconds": f"{seconds:.1f}",
                "torchslim.seed": str(seed),
                "torchslim.settings": json.dumps(dataclasses.asdict(settings), sort_keys=True)}
    try:
        _save(path, model, metadata)
    except OSError as exc:  # a read-only or full disk costs a retrain next time, not this run
        logger.warning("could not cache the trained FashionCNN in %s (%s); set $TORCHSLIM_CACHE "
                       "to a writable folder to keep it", path, exc)
    return model.eval()


def _train(seed: int, settings: TrainSettings, progress: bool) -> nn.Module:
    from torchslim.core.context import Context
    from torchslim.recipes.schema import TrainSpec
    from torchslim.train import fit

    train = head(load_data(settings.data, "train"), settings.train_limit)
    spec = TrainSpec(epochs=settings.epochs, lr=settings.lr, batch_size=settings.batch_size,
                     weight_decay=settings.weight_decay)
    model = _build(settings, seed)
    with torch.random.fork_rng(devices=[]):  # fit seeds the global RNG; restore the caller's
        fit(model, spec, [], Context(train_data=train, seed=seed, progress=progress))
    return model.eval()


def _load(path: Path, model: nn.Module) -> bool:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except (SafetensorError, RuntimeError, OSError) as exc:
        logger.warning("ignoring unreadable cached weights %s (%s); training again", path, exc)
        return False
    return True


def _save(path: Path, model: nn.Module, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp), metadata=metadata)
        tmp.replace(path)  # atomic: readers see the old file or the whole new one
    finally:
        tmp.unlink(missing_ok=True)
