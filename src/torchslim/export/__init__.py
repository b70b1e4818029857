"""Write and reload compressed models: a checkpoint folder, or an ONNX file.

``torchslim.export.onnx`` imports onnx and onnxruntime only inside its functions, so these
re-exports keep ``import torchslim.export`` free of them.
"""

from torchslim.export.checkpoint import load, save
from torchslim.export.onnx import OnnxModule, export_onnx, onnx_latency

__all__ = ["OnnxModule", "export_onnx", "load", "onnx_latency", "save"]
