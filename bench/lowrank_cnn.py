"""fashion_cnn convolutions: lowrank.tucker (rank 0.5) and lowrank.separable (m=1), before and after fine-tuning.

Model: the bundled pretrained ``fashion_cnn`` (trained on first use and cached). Each method
runs with its default selection (every Conv2d; layers where it would not save FLOPs are left
alone), then the model is fine-tuned for ``--epochs`` on the full Fashion-MNIST train split
(Adam, cosine schedule, batch 128, the same data order for every row; the original gets
the same fine-tune as a control). Measures: parameters, FLOPs of one 28x28 image, median
latency at batch 64 (all models timed alternately, median of rounds) and test accuracy on
the 10k test images.

Run: flock /tmp/torchslim-bench.lock python bench/lowrank_cnn.py [--epochs 1]   (about 5 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import torchslim as ts
from torchslim.core import MethodConfig
from torchslim.lowrank import SeparableConfig, TuckerConfig
from torchslim.measure.flops import count_flops
from torchslim.measure.latency import model_latency
from torchslim.measure.params import count_params
from torchslim.recipes import Recipe, Stage, TrainSpec
from torchslim.zoo import accuracy, fashion_mnist, pretrained_fashion_cnn

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "lowrank_cnn.md"
METHODS: dict[str, MethodConfig | None] = {
    "original": None,
    "lowrank.tucker rank 0.5": TuckerConfig(rank=0.5),
    "lowrank.separable m=1": SeparableConfig(depth_multiplier=1),
}


def finetune(model: nn.Module, epochs: int, lr: float) -> nn.Module:
    spec = TrainSpec(epochs=epochs, lr=lr, batch_size=128)
    recipe = Recipe(stages=(Stage(name="finetune", methods=(), train=spec),), measure=())
    ctx = ts.Context(train_data=fashion_mnist("train"), seed=0, progress=False)
    return ts.compress(model, recipe, ctx).model.eval()


def latencies(models: dict[str, nn.Module], x: torch.Tensor, rounds: int = 7) -> dict[str, float]:
    """Median over rounds of each model's median latency; the models take turns within a round."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            times[name].append(model_latency(model, x, warmup=3, repeats=15)["latency_ms"])
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=5e-4)
    args = parser.parse_args()
    torch.set_num_threads(2)
    original, test = pretrained_fashion_cnn(), fashion_mnist("test")
    one, batch = test.tensors[0][:1], test.tensors[0][:64]
    models: dict[str, nn.Module] = {}
    notes: dict[str, str] = {}
    for name, cfg in METHODS.items():
        model = copy.deepcopy(original)
        if cfg is not None:
            out = ts.apply(model, cfg, ts.Context(example_inputs=one))
            model, stage = out.model.eval(), out.record.outcomes[0]
            notes[name] = "; ".join(f"`{f}` " + ", ".join(f"{k} {v:g}" for k, v in stage.layers[f].items())
                                    for f in stage.touched)
        models[name] = model
        started = time.perf_counter()
        models[f"{name} + fine-tune"] = finetune(copy.deepcopy(model), args.epochs, args.lr)
        print(name, f"fine-tuned in {time.perf_counter() - started:.0f} s")
    speed = latencies(models, batch)
    rows = []
    for name, model in models.items():
        row = {"params": count_params(model)[0], "flops": count_flops(model, one),
               "latency": speed[name], "accuracy": accuracy(model, test)}
        print(name, row)
        rows.append((name, row))
    DOC.write_text(render(rows, notes, args))
    print(f"wrote {DOC}")


def render(rows: list[tuple[str, dict[str, float]]], notes: dict[str, str], args: argparse.Namespace) -> str:
    base = rows[0][1]
    lines = ["# Low-rank convolutions on fashion_cnn: Tucker-2 and depthwise-separable", "",
             "The bundled pretrained `fashion_cnn` (conv 1->32, residual block of two 32->32 convs, conv 32->64, "
             "all 3x3; then a 3136 -> 128 -> 10 classifier that holds most of the parameters). Each method "
             f"runs with its defaults on every Conv2d, then {args.epochs} epoch(s) of fine-tuning on the full "
             f"Fashion-MNIST train split (Adam lr {args.lr:g}, cosine, batch 128); the original gets the same "
             "fine-tune as a control. Accuracy: the 10k test images.", "",
             "| model | params | FLOPs (1 image) | FLOPs vs original | latency ms (batch 64) | speed-up | test accuracy |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['params']:,.0f} | {r['flops'] / 1e6:.2f} M | {r['flops'] / base['flops']:.2f} | "
                     f"{r['latency']:.2f} | {base['latency'] / r['latency']:.2f}x | {r['accuracy']:.2%} |")
    lines += ["", "Layers replaced (ranks, multiply-adds per output pixel relative to the dense conv):", ""]
    lines += [f"- {name}: {text}" for name, text in notes.items()]
    lines += ["", f"Reproduce: `flock /tmp/torchslim-bench.lock python bench/lowrank_cnn.py --epochs {args.epochs}`. "
              f"Machine: {platform.processor() or platform.machine()}, 2 threads, shared (load average "
              f"{os.getloadavg()[0]:.1f}); torch {torch.__version__}. Latency: each model's median over 15 calls, "
              "the models timed in turn, median of 7 rounds.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
