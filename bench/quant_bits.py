"""Accuracy vs bit width on fashion_cnn: fixed point, uniform integer (static), ternary and binary.

Post-training, no fine-tuning: ``quantization.fixed_point`` (Qm.n weights and activations of
``total_bits``) and ``quantization.ptq`` (per-channel weights and asymmetric activations of the
same width, MSE observer) at 2..8 bits. Trained: ``quantization.ternary`` (2-bit codes) and
``quantization.binary`` (1 bit), first and last layer kept in float as in the papers, from the
pretrained model with ``--epochs`` of training on ``--train`` images (Adam, lr 5e-4); the
fp32 model fine-tuned the same way is the control. Test accuracy on the 10k test images.

Run: python bench/quant_bits.py [--epochs 1] [--train 20000]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
from pathlib import Path

import torch

import torchslim as ts
from torchslim.core.config import MethodConfig
from torchslim.quantization import (
    BinaryQuantizationConfig,
    FixedPointConfig,
    PTQConfig,
    TernaryQuantizationConfig,
)
from torchslim.recipes import Recipe, Stage, TrainSpec
from torchslim.zoo import accuracy, fashion_mnist, head, loader, pretrained_fashion_cnn

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "quantization-bits.md"


def _trained(cfg: MethodConfig | None, ctx: ts.Context, epochs: int) -> torch.nn.Module:
    spec = TrainSpec(epochs=epochs, lr=5e-4, batch_size=128)
    stage = Stage(name="train", methods=(cfg,) if cfg else (), train=spec)
    return ts.compress(pretrained_fashion_cnn(), Recipe(stages=(stage,), measure=()), ctx).model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train", type=int, default=20_000)
    args = parser.parse_args()
    torch.set_num_threads(2)
    train, test = head(fashion_mnist("train"), args.train), fashion_mnist("test")
    calib = list(train.tensors[0][:256].split(32))
    ctx = ts.Context(example_inputs=calib[0][:1], calib_data=calib, seed=0, progress=False,
                     train_data=loader(train, 128, shuffle=True, seed=0))
    fp32 = 100 * accuracy(pretrained_fashion_cnn(), test)
    rows: list[tuple[int, str, float]] = []
    for bits in range(2, 9):
        fixed = ts.apply(pretrained_fashion_cnn(), FixedPointConfig(total_bits=bits), ctx).model
        rows.append((bits, "fixed point Qm.n (weights and activations)", 100 * accuracy(fixed, test)))
        ptq = ts.apply(copy.deepcopy(pretrained_fashion_cnn()), PTQConfig(weight_bits=bits, activation_bits=bits),
                       ctx).model
        rows.append((bits, "uniform integer, static (quantization.ptq)", 100 * accuracy(ptq, test)))
        print(rows[-2:])
    control = 100 * accuracy(_trained(None, ctx, args.epochs), test)
    rows.append((2, f"ternary (TWN), trained {args.epochs} epoch(s)", 100 * accuracy(
        _trained(TernaryQuantizationConfig(), ctx, args.epochs), test)))
    rows.append((1, f"binary (XNOR weights), trained {args.epochs} epoch(s)", 100 * accuracy(
        _trained(BinaryQuantizationConfig(), ctx, args.epochs), test)))
    print(rows[-2:], control)
    lines = ["# Accuracy vs bit width (fashion_cnn)", "",
             f"Pretrained `fashion_cnn`: fp32 test accuracy {fp32:.2f}%; fine-tuned in float the same way as the "
             f"trained rows (control): {control:.2f}%. Post-training rows use 256 calibration images and no "
             "training. Ternary and binary quantize every layer but the first and last (kept float).", "",
             "| bits | method | test accuracy % | vs fp32 |", "|---|---|---|---|"]
    for bits, name, acc in sorted(rows, key=lambda r: (-r[0], r[1])):
        lines.append(f"| {bits} | {name} | {acc:.2f} | {acc - fp32:+.2f} |")
    lines += ["", "Targets (issue 13): ternary within 2 points of fp32, binary within 4.",
              f"Machine: {platform.processor() or platform.machine()}, shared 2 cores (load average "
              f"{os.getloadavg()[0]:.1f}); torch {torch.__version__}. Reproduce: "
              f"`python bench/quant_bits.py --epochs {args.epochs} --train {args.train}`.", ""]
    DOC.write_text("\n".join(lines))
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
