"""Quantization: fewer bits per weight and activation, run with real integer kernels."""

from torchslim.quantization.dynamic import DynamicQuantizationConfig

__all__ = ["DynamicQuantizationConfig"]
