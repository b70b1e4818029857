"""Quantization: fewer bits per weight and activation, run with real integer kernels."""

from torchslim.quantization.awq import AWQConfig
from torchslim.quantization.binary import BinaryQuantizationConfig
from torchslim.quantization.dynamic import DynamicQuantizationConfig
from torchslim.quantization.embedding import WeightOnlyEmbedding
from torchslim.quantization.fixed import FixedPointConv2d, FixedPointLinear
from torchslim.quantization.fixed_point import FixedPointConfig
from torchslim.quantization.gptq import GPTQConfig
from torchslim.quantization.lowbit import BinaryConv2d, BinaryLinear, TernaryConv2d, TernaryLinear
from torchslim.quantization.mixed import MixedPrecisionConfig
from torchslim.quantization.packed import WeightOnlyLinear
from torchslim.quantization.ptq import PTQConfig
from torchslim.quantization.qat import QATConfig
from torchslim.quantization.static_modules import QDQConv2d, QDQLinear, RoundedOutput
from torchslim.quantization.ternary import TernaryQuantizationConfig
from torchslim.quantization.weight_only import WeightOnlyConfig

__all__ = [
    "AWQConfig",
    "BinaryConv2d",
    "BinaryLinear",
    "BinaryQuantizationConfig",
    "DynamicQuantizationConfig",
    "FixedPointConfig",
    "FixedPointConv2d",
    "FixedPointLinear",
    "GPTQConfig",
    "MixedPrecisionConfig",
    "PTQConfig",
    "QATConfig",
    "QDQConv2d",
    "QDQLinear",
    "RoundedOutput",
    "TernaryConv2d",
    "TernaryLinear",
    "TernaryQuantizationConfig",
    "WeightOnlyConfig",
    "WeightOnlyEmbedding",
    "WeightOnlyLinear",
]
