"""Bundled models and data sets: Fashion-MNIST, sklearn digits, FashionCNN, MLP.

Nothing is downloaded: the data come from installed packages and the pretrained FashionCNN
is trained on first use and cached (see ``torchslim.zoo.pretrained``).
"""

from torchslim.zoo.data import (
    DATASETS,
    accuracy,
    digits,
    fashion_mnist,
    head,
    load_data,
    loader,
    make_eval_fn,
)
from torchslim.zoo.models import MLP, MODELS, FashionCNN, build_model
from torchslim.zoo.pretrained import TrainSettings, cache_dir, pretrained_fashion_cnn

__all__ = [
    "DATASETS",
    "MLP",
    "MODELS",
    "FashionCNN",
    "TrainSettings",
    "accuracy",
    "build_model",
    "cache_dir",
    "digits",
    "fashion_mnist",
    "head",
    "load_data",
    "loader",
    "make_eval_fn",
    "pretrained_fashion_cnn",
]
