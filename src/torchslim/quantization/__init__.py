"""Quantization: fewer bits per weight and activation, run with real integer kernels."""

from torchslim.quantization.awq import AWQConfig
from torchslim.quantization.dynamic import DynamicQuantizationConfig
from torchslim.quantization.gptq import GPTQConfig
from torchslim.quantization.packed import WeightOnlyLinear
from torchslim.quantization.ptq import PTQConfig
from torchslim.quantization.static_modules import QDQConv2d, QDQLinear
from torchslim.quantization.weight_only import WeightOnlyConfig

__all__ = ["AWQConfig", "DynamicQuantizationConfig", "GPTQConfig", "PTQConfig", "QDQConv2d", "QDQLinear",
           "WeightOnlyConfig", "WeightOnlyLinear"]
