"""Pure measurement functions: params, size, FLOPs, latency and the task metric."""

from torchslim.measure.flops import count_flops
from torchslim.measure.latency import measure_latency, model_latency
from torchslim.measure.metrics import environment, measure_all
from torchslim.measure.params import count_params
from torchslim.measure.size import size_bytes

__all__ = [
    "count_flops",
    "count_params",
    "environment",
    "measure_all",
    "measure_latency",
    "model_latency",
    "size_bytes",
]
