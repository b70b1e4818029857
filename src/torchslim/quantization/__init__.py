"""Quantization: fewer bits per weight and activation, run with real integer kernels."""
