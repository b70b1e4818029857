"""A half-width CNN student of ``fashion_cnn``: no distillation vs logits vs logits + features + attention.

Teacher: the bundled pretrained ``fashion_cnn`` (width 32, hidden 128). Student: the same
architecture at half the channels (width 16, hidden 64; about a quarter of the convolution
FLOPs), randomly initialised (seeded), trained on full Fashion-MNIST (60k) with the same
epochs, optimiser and data order in every variant; test accuracy on the 10k test images.

Run: python bench/distill_cnn.py [--epochs 6] [--variants none,logits,all] [--seeds 1]
Each variant takes about 6 minutes on 2 cores; results are merged into the table file, so
variants can run separately.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import torchslim as ts
from torchslim.distillation import (
    AttentionDistillationConfig,
    FeatureDistillationConfig,
    LogitDistillationConfig,
)
from torchslim.recipes import Recipe, Stage, TrainSpec
from torchslim.zoo import FashionCNN, accuracy, fashion_mnist, pretrained_fashion_cnn

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "distillation-cnn.md"
STATE = DOC.with_suffix(".json")
VARIANTS = {
    "none": [],
    "logits": [LogitDistillationConfig(temperature=4.0, alpha=0.9)],
    "all": [LogitDistillationConfig(temperature=4.0, alpha=0.9),
            FeatureDistillationConfig(pairs=("down:down",), weight=1.0),
            AttentionDistillationConfig(pairs=("block:block", "down:down"), weight=100.0)],
}
LABEL = {"none": "no distillation (hard labels)", "logits": "distillation.logits (T=4, alpha=0.9)",
         "all": "logits + features (down, 1x1 projection) + attention maps (block, down)"}


def student(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return FashionCNN(width=16, hidden=64)


def run(variant: str, seed: int, epochs: int) -> dict[str, float]:
    teacher = pretrained_fashion_cnn()
    train, test = fashion_mnist("train"), fashion_mnist("test")
    model = student(seed)
    spec = TrainSpec(epochs=epochs, lr=2e-3, batch_size=128)
    recipe = Recipe(stages=(Stage(name="train", methods=tuple(VARIANTS[variant]), train=spec),), measure=())
    ctx = ts.Context(train_data=train, example_inputs=test.tensors[0][:1], teacher=teacher, seed=seed,
                     progress=False)
    started = time.perf_counter()
    result = ts.compress(model, recipe, ctx)
    seconds = time.perf_counter() - started
    return {"accuracy": accuracy(result.model, test), "seconds": seconds}


def _render(state: dict[str, dict[str, list[dict[str, float]]]], epochs: int) -> str:
    teacher_acc = accuracy(pretrained_fashion_cnn(), fashion_mnist("test"))
    params_s = sum(p.numel() for p in student(0).parameters())
    params_t = sum(p.numel() for p in pretrained_fashion_cnn().parameters())
    load = os.getloadavg()[0]
    lines = ["# Distillation into a half-width CNN student", "",
             f"Teacher `fashion_cnn` ({params_t:,} params): test accuracy {teacher_acc:.2%}. Student: "
             f"FashionCNN width 16, hidden 64 ({params_s:,} params), seeded random init, {epochs} epochs on "
             "full Fashion-MNIST, Adam lr 2e-3, cosine schedule, batch 128; the same data order in every variant.",
             "", "| student training | test accuracy | seeds | seconds per run |", "|---|---|---|---|"]
    for variant in VARIANTS:
        runs = state.get(variant, {}).get(str(epochs), [])
        if not runs:
            continue
        accs = [r["accuracy"] for r in runs]
        spread = f" ± {statistics.stdev(accs):.2%}" if len(accs) > 1 else ""
        lines.append(f"| {LABEL[variant]} | {statistics.mean(accs):.2%}{spread} | {len(accs)} | "
                     f"{statistics.mean(r['seconds'] for r in runs):.0f} |")
    lines += ["", f"Reproduce: `python bench/distill_cnn.py --epochs {epochs}`. Machine: "
              f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, load average "
              f"{load:.1f} (shared); torch {torch.__version__}.",
              "Attention transfer uses Zagoruyko & Komodakis' normalised squared-activation maps; its weight "
              "(100) follows their beta/2 = 500 scaled to our mean over pixels.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--variants", default="none,logits,all")
    parser.add_argument("--seeds", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(2)
    state = json.loads(STATE.read_text()) if STATE.is_file() else {}
    for variant in args.variants.split(","):
        runs = [run(variant, seed, args.epochs) for seed in range(args.seeds)]
        print(variant, runs)
        state.setdefault(variant, {})[str(args.epochs)] = runs
        STATE.write_text(json.dumps(state, indent=1))
    DOC.write_text(_render(state, args.epochs))
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
