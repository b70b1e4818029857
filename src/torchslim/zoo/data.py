"""The bundled data sets (full Fashion-MNIST, sklearn digits) and accuracy helpers.

Nothing is downloaded: Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist``
(its files are located with ``dpkg -L``), digits from scikit-learn.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from torchslim.core.config import closest
from torchslim.errors import DataError
from torchslim.zoo.idx import read_idx

__all__ = [
    "DATASETS",
    "DIGITS_MEAN",
    "DIGITS_STD",
    "FASHION_MNIST_PACKAGE",
    "FASHION_MEAN",
    "FASHION_STD",
    "SPLITS",
    "accuracy",
    "digits",
    "fashion_mnist",
    "head",
    "load_data",
    "loader",
    "locate_fashion_mnist",
    "make_eval_fn",
]

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
DIGITS_MEAN, DIGITS_STD = 0.3053, 0.3760  # of all 1,797 images scaled to [0, 1]
DIGITS_TEST_FRACTION = 0.2
_DIR_ENV = "TORCHSLIM_FASHION_MNIST_DIR"  # optional override for machines without dpkg
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_FASHION_SIZES = {"train": 60_000, "test": 10_000}


def _check_split(split: str, where: str) -> None:
    if split not in SPLITS:
        raise DataError(f"{where}: unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def locate_fashion_mnist(package: str = FASHION_MNIST_PACKAGE) -> dict[str, Path]:
    """File name -> path of the four Fashion-MNIST IDX files.

    The folder named by ``$TORCHSLIM_FASHION_MNIST_DIR`` wins when set; otherwise the files
    are found through ``dpkg -L <package>``.

    Raises:
        DataError: the package is not installed (the message says how to install it) or
            lacks one of the files.
    """
    wanted = [name for pair in _FASHION_FILES.values() for name in pair]
    if folder := os.environ.get(_DIR_ENV):
        found = {name: Path(folder) / name for name in wanted if (Path(folder) / name).is_file()}
        where = f"${_DIR_ENV}={folder}"
    else:
        listed = _dpkg_files(package)
        found = {Path(p).name: Path(p) for p in listed if Path(p).name in wanted}
        where = f"Debian package {package}"
    if missing := [name for name in wanted if name not in found]:
        raise DataError(f"Fashion-MNIST: {where} lacks {', '.join(missing)}; expected the four IDX files "
                        f"(reinstall with: apt-get update && apt-get install -y --reinstall {package})")
    return found


def _dpkg_files(package: str) -> list[str]:
    install = f"apt-get update && apt-get install -y {package}"
    try:
        done = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise DataError(f"Fashion-MNIST needs the Debian package {package}, but dpkg is not available "
                        f"here; on Debian/Ubuntu run: {install}, or set ${_DIR_ENV} to a folder "
                        "holding the four IDX .gz files") from exc
    if done.returncode != 0:
        raise DataError(f"Fashion-MNIST needs the Debian package {package}, which is not installed "
                        f"(dpkg -L: {done.stderr.strip() or 'failed'}); install it with: {install}")
    return done.stdout.split()


@functools.cache
def _fashion_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    files = locate_fashion_mnist()
    image_name, label_name = _FASHION_FILES[split]
    images = read_idx(files[image_name], ndim=3)
    labels = read_idx(files[label_name], ndim=1)
    expected = (_FASHION_SIZES[split], 28, 28)
    if images.shape != expected:
        raise DataError(f"{files[image_name]}: expected images of shape {expected}, found {images.shape}")
    if labels.shape != expected[:1] or int(labels.max()) > 9:
        raise DataError(f"{files[label_name]}: expected {expected[0]} labels in 0..9, found "
                        f"{labels.shape[0]} with maximum {int(labels.max())}")
    logger.debug("decoded Fashion-MNIST %s: %d images", split, images.shape[0])
    return images, labels


def _to_dataset(images: np.ndarray, labels: np.ndarray, scale: float, mean: float,
                std: float) -> TensorDataset:
    x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1)  # (N, 1, H, W), a fresh copy
    x.mul_(1.0 / scale).sub_(mean).div_(std)
    y = torch.from_numpy(labels.astype(np.int64))
    return TensorDataset(x, y)


def fashion_mnist(split: str = "train") -> TensorDataset:
    """Full Fashion-MNIST: 60,000 train or 10,000 test images of clothing, 10 classes.

    Returns:
        ``(images, labels)``: float32 ``(N, 1, 28, 28)`` normalised with mean 0.2860 and
        std 0.3530, and int64 ``(N,)``.

    Raises:
        DataError: unknown split, package missing or a corrupt file.
    """
    _check_split(split, "fashion_mnist")
    images, labels = _fashion_arrays(split)
    return _to_dataset(images, labels, 255.0, FASHION_MEAN, FASHION_STD)


@functools.cache
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DataError("the digits data set needs scikit-learn, which is not installed; "
                        "install it with: pip install scikit-learn") from exc
    bunch = load_digits()
    return np.asarray(bunch.images), np.asarray(bunch.target)


def digits(split: str = "train", *, seed: int = 0) -> TensorDataset:
    """sklearn's 1,797 handwritten digits (8x8, 10 classes) with a seeded 80/20 split.

    Returns:
        float32 ``(N, 1, 8, 8)`` images scaled to [0, 1] then standardised, and int64 labels.
    """
    _check_split(split, "digits")
    images, labels = _digits_arrays()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).numpy()
    n_test = round(len(labels) * DIGITS_TEST_FRACTION)
    index = order[n_test:] if split == "train" else order[:n_test]
    return _to_dataset(images[index], labels[index], 16.0, DIGITS_MEAN, DIGITS_STD)


def head(dataset: TensorDataset, n: int | None) -> TensorDataset:
    """The first ``n`` samples of ``dataset`` (all of them when ``n`` is None), sharing memory."""
    if n is None or n >= len(dataset):
        return dataset
    return TensorDataset(*(t[:n] for t in dataset.tensors))


DATASETS: dict[str, Callable[[str], TensorDataset]] = {
    "fashion_mnist": fashion_mnist,
    "digits": digits,
}


def load_data(name: str, split: str = "train") -> TensorDataset:
    """The ``split`` of the registered data set ``name`` (see ``DATASETS``).

    Raises:
        DataError: unknown name (with the closest known name) or split.
    """
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}{closest(name, DATASETS)}; "
                        f"known: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](split)


def loader(dataset: Dataset[Any], batch_size: int, *, shuffle: bool = False,
           seed: int = 0) -> DataLoader[Any]:
    """A DataLoader; with ``shuffle`` its order is fixed by ``seed``.

    It owns its random generator, so iterating it never draws from the global RNG.
    """
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def accuracy(model: nn.Module, data: Dataset[Any] | Iterable[Any], *, batch_size: int = 1000,
             limit: int | None = None) -> float:
    """Top-1 accuracy of ``model`` on ``(inputs, labels)`` data, computed on the CPU.

    The model runs in eval mode under ``torch.inference_mode`` and gets its train/eval mode
    back afterwards. It may be any module taking a float tensor and returning logits (an
    ONNX Runtime wrapper too).

    Args:
        model: The classifier.
        data: A Dataset of ``(input, label)`` or an iterable of ``(inputs, labels)`` batches.
        batch_size: Batch size when ``data`` is a Dataset.
        limit: Score only the first ``limit`` samples.
    """
    batches = loader(data, batch_size) if isinstance(data, Dataset) else data
    was_training = model.training
    correct = seen = 0
    model.eval()
    try:
        with torch.inference_mode():
            for inputs, labels in batches:
                if limit is not None and seen >= limit:
                    break
                keep = len(labels) if limit is None else min(len(labels), limit - seen)
                logits = model(inputs[:keep])
                logits = getattr(logits, "logits", logits)
                correct += int((torch.as_tensor(logits).argmax(-1) == labels[:keep]).sum())
                seen += keep
    finally:
        model.train(was_training)
    if seen == 0:
        raise DataError("accuracy: the evaluation data is empty (expected at least one sample)")
    return correct / seen


def make_eval_fn(dataset: Dataset[Any], *, batch_size: int = 1000,
                 limit: int | None = None) -> Callable[[nn.Module], dict[str, float]]:
    """An ``eval_fn`` for ``Context``: ``model -> {"accuracy": top-1 on dataset}``."""

    def eval_fn(model: nn.Module) -> dict[str, float]:
        return {"accuracy": accuracy(model, dataset, batch_size=batch_size, limit=limit)}

    return eval_fn
