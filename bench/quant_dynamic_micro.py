"""Micro-benchmark: fp32 nn.Linear vs DynamicQuantLinear (int8), in PyTorch and ONNX Runtime.

Run: python bench/quant_dynamic_micro.py [--threads 2] [--no-onnx]
Prints one row per shape: median latency (ms) of each variant and the int8 speed-up.
Timings on a shared machine are noisy: compare the min column too.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn

from torchslim.measure.latency import measure_latency
from torchslim.quantization.modules import DynamicQuantLinear

SHAPES = [  # (input shape, in_features, out_features)
    ((1024, 384), 384, 1536),  # 1024 tokens through a transformer MLP up-projection
    ((1024, 1536), 1536, 384),  # ... and its down-projection
    ((8, 3136), 3136, 128),  # a CNN classifier head on a small batch
    ((4, 256, 384), 384, 1536),  # (B, T, in) input
    ((1, 384), 384, 1536),  # one token
    ((8, 2048), 2048, 2048),  # a few rows through a large layer: the oneDNN-packed weight
]


def _time(module: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    with torch.inference_mode():
        stats = measure_latency(lambda: module(x), warmup=10, repeats=50, min_seconds=0.5)
    return stats["latency_ms"], stats["latency_min_ms"]


def _onnx_times(module: nn.Module, x: torch.Tensor, folder: Path, name: str) -> tuple[float, float]:
    from torchslim.export.onnx import export_onnx, onnx_latency

    path = folder / f"{name}.onnx"
    export_onnx(module, x, path, min_cosine=0.99)
    stats = onnx_latency(path, x, warmup=10, repeats=50, min_seconds=0.5)
    return stats["latency_ms"], stats["latency_min_ms"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-onnx", action="store_true", help="time PyTorch only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms as median (min)")
    header = f"{'input':>16} {'in->out':>11} | {'torch fp32':>15} {'torch int8':>15} {'x':>5}"
    if not args.no_onnx:
        header += f" | {'ORT fp32':>15} {'ORT int8':>15} {'x':>5}"
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        for shape, k, n in SHAPES:
            fp32 = nn.Linear(k, n).eval()
            int8 = DynamicQuantLinear.from_linear(fp32).eval()
            x = torch.randn(*shape)
            f_med, f_min = _time(fp32, x)
            q_med, q_min = _time(int8, x)
            row = (f"{str(tuple(shape)):>16} {f'{k}->{n}':>11} | {f_med:7.3f} ({f_min:6.3f}) "
                   f"{q_med:7.3f} ({q_min:6.3f}) {f_med / q_med:5.2f}")
            if not args.no_onnx:
                of_med, of_min = _onnx_times(fp32, x, Path(tmp), f"fp32_{k}_{n}")
                oq_med, oq_min = _onnx_times(int8, x, Path(tmp), f"int8_{k}_{n}")
                row += f" | {of_med:7.3f} ({of_min:6.3f}) {oq_med:7.3f} ({oq_min:6.3f}) {of_med / oq_med:5.2f}"
            print(row)


if __name__ == "__main__":
    main()
