"""Qm.n fixed point on the pretrained ``fashion_cnn``: test accuracy against word length.

Model: the bundled pretrained ``fashion_cnn`` (trained and cached on first use). Every Conv2d
and Linear becomes a FixedPointConv2d / FixedPointLinear (``quantization.fixed_point``):
weights, layer inputs and layer outputs in Qm.n of ``total_bits`` bits, the fractional bits
chosen per layer from the weight range and from 8 calibration batches of 128 training images;
integer-only multiply-accumulate, integer bias, rounding right shift. BatchNorm, ReLU and
pooling stay float. Accuracy on the 10,000 Fashion-MNIST test images.

Run: python bench/quant_fixed_point.py [--bits 4,6,8,12,16]
Writes docs/benchmarks/fixed_point.md (about 5 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import platform
import time
from pathlib import Path

import torch

import torchslim as ts
from torchslim.core.storage import serialized_size
from torchslim.quantization import FixedPointConfig
from torchslim.zoo import accuracy, fashion_mnist, loader, pretrained_fashion_cnn

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "fixed_point.md"
CALIB_BATCHES, CALIB_SIZE = 8, 128


def run(bits: list[int]) -> str:
    model = pretrained_fashion_cnn()
    test, train = fashion_mnist("test"), fashion_mnist("train")
    calib = [x for x, _ in itertools.islice(loader(train, CALIB_SIZE, shuffle=True), CALIB_BATCHES)]
    ctx = ts.Context(calib_data=calib, seed=0)
    started = time.perf_counter()
    rows = [("float32 (no quantization)", accuracy(model, test, batch_size=250), serialized_size(model),
             time.perf_counter() - started, "")]
    formats = ""
    for b in bits:
        started = time.perf_counter()
        result = ts.apply(copy.deepcopy(model), FixedPointConfig(total_bits=b, batches=CALIB_BATCHES), ctx)
        acc = accuracy(result.model, test, batch_size=250)
        layers = result.record.outcomes[0].layers
        q = ", ".join(f"{f} Q{b - 1 - v['weight_frac']}.{v['weight_frac']}" for f, v in layers.items())
        rows.append((f"Q, total_bits {b}", acc, serialized_size(result.model), time.perf_counter() - started, q))
        if b == 8:
            formats = "\n".join(
                f"| `{f}` | {v['weight_frac']} | {v['input_frac']} | {v['output_frac']} |" for f, v in layers.items())
        print(b, f"{acc:.4f}", flush=True)
    return _render(rows, formats)


def _render(rows: list[tuple[str, float, int, float, str]], formats: str) -> str:
    lines = [
        "# Fixed point (Qm.n) on fashion_cnn", "",
        "`quantization.fixed_point` on the pretrained `fashion_cnn`: all 4 Conv2d and 2 Linear layers compute "
        "with integers only (inputs rounded to nearest into Qm.n and saturated, int8 GEMM with int32 "
        "accumulation up to 8 bits and int64 above, integer bias at the accumulator's precision, rounding "
        "arithmetic right shift to the output format). Weights, layer inputs and layer outputs use the same "
        "word length; the fractional bits are chosen per layer (weights from their largest |w|, inputs and "
        f"outputs from {CALIB_BATCHES} calibration batches of {CALIB_SIZE} training images). Post-training, "
        "round-to-nearest: no fine-tuning. BatchNorm, ReLU and pooling stay float32. Test accuracy on the "
        "10,000 Fashion-MNIST test images.", "",
        "| model | test accuracy | saved weights (bytes) | seconds (convert + evaluate) |",
        "|---|---|---|---|",
    ]
    for name, acc, size, seconds, _ in rows:
        lines.append(f"| {name} | {acc:.2%} | {size:,} | {seconds:.0f} |")
    lines += ["", "Fractional bits chosen at 8 bits (weight, input, output):", "",
              "| layer | weight_frac | input_frac | output_frac |", "|---|---|---|---|", formats, "",
              f"Reproduce: `python bench/quant_fixed_point.py`. Machine: {platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} (shared); "
              f"torch {torch.__version__}. Sizes are the weights as `ts.save` writes them (int8 up to 8 bits, "
              "int16 above, int64 biases; BatchNorm in float32).",
              "Seconds are wall time on a shared machine under load and only indicative. The 4-bit file is "
              "smaller than half the 8-bit one because many 4-bit weights round to zero and `ts.save` stores "
              "such tensors as bitmask + values; 12 and 16 bits both store int16.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", default="4,6,8,12,16")
    args = parser.parse_args()
    torch.set_num_threads(2)
    DOC.write_text(run([int(b) for b in args.bits.split(",")]))
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
