"""Channel pruning to half the FLOPs on fashion_cnn: every importance criterion, one-shot vs iterative.

The pretrained ``fashion_cnn`` is pruned with ``pruning.channel`` at the smallest ratio that
removes at least 50% of its FLOPs, then fine-tuned; every variant gets the same total number of
fine-tuning steps and the same data order. One-shot: one prune, then ``--epochs`` of training.
Iterative: three prune -> train rounds at the per-round ratio that compounds to the same
channel count, each with a third of the epochs. Test accuracy on the 10k test images.

Run: python bench/pruning_accuracy.py [--epochs 2] [--train 20000] [--variants l2,taylor,...]
Results merge into docs/benchmarks/pruning-accuracy.md (so variants can run separately).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

import torchslim as ts
from torchslim.measure.flops import count_flops
from torchslim.pruning import ChannelPruningConfig
from torchslim.recipes import Recipe, Stage, TrainSpec
from torchslim.zoo import accuracy, fashion_mnist, head, loader, pretrained_fashion_cnn

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "pruning-accuracy.md"
STATE = DOC.with_suffix(".json")
CRITERIA = ("l1", "l2", "taylor", "entropy", "bn_scale", "apoz")
VARIANTS = [*CRITERIA, *(f"iterative-{c}" for c in ("l2", "taylor"))]
IGNORE = ("classifier.3",)  # the logits keep their width


def _ctx(train: Any, test: Any, seed: int = 0) -> ts.Context:
    calib = list(train.tensors[0][:512].split(64))
    return ts.Context(example_inputs=test.tensors[0][:1], calib_data=calib,
                      train_data=loader(train, 128, shuffle=True, seed=seed), seed=seed, progress=False)


def half_flops_ratio(model: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """The smallest ratio (step 0.01) whose pruned model has <= 50% of the FLOPs, and that share."""
    base = count_flops(model, x)
    for r in [i / 100 for i in range(20, 60)]:
        out = ts.apply(pretrained_fashion_cnn(), ChannelPruningConfig(ratio=r, ignore=IGNORE), ts.Context(
            example_inputs=x)).model
        share = count_flops(out, x) / base
        if share <= 0.5:
            return r, share
    raise RuntimeError("no ratio below 0.6 halves the FLOPs")


def run(variant: str, ratio: float, epochs: int, train: Any, test: Any) -> dict[str, Any]:
    iterative = variant.startswith("iterative-")
    importance = variant.removeprefix("iterative-")
    rounds = 3 if iterative else 1
    per_round = 1 - (1 - ratio) ** (1 / rounds)
    steps = int(epochs * math.ceil(len(train) / 128))
    stages = tuple(Stage(name=f"prune{i}", methods=(ChannelPruningConfig(ratio=per_round, importance=importance,
                                                                          ignore=IGNORE),),
                         train=TrainSpec(steps=steps // rounds, lr=1e-3, batch_size=128)) for i in range(rounds))
    model = pretrained_fashion_cnn()
    x = test.tensors[0][:1]
    base_flops = count_flops(model, x)
    started = time.perf_counter()
    result = ts.compress(model, Recipe(stages=stages, measure=()), _ctx(train, test))
    row = {"variant": variant, "ratio_per_round": round(per_round, 4), "rounds": rounds,
           "flops_share": count_flops(result.model, x) / base_flops,
           "accuracy": 100 * accuracy(result.model, test), "minutes": (time.perf_counter() - started) / 60,
           "date": time.strftime("%Y-%m-%d %H:%M")}
    one_shot = ts.apply(pretrained_fashion_cnn(), ChannelPruningConfig(ratio=ratio, importance=importance,
                                                                       ignore=IGNORE), _ctx(train, test)).model
    row["accuracy_before_finetune"] = 100 * accuracy(one_shot, test) if not iterative else None
    return row


def render(state: dict[str, Any]) -> str:
    meta = state["meta"]
    lines = ["# Channel pruning to half the FLOPs: criteria and schedules (fashion_cnn)", "",
             f"Pretrained `fashion_cnn` (test accuracy {meta['dense']:.2f}%), `pruning.channel` at ratio "
             f"{meta['ratio']:.2f} (the smallest that leaves <= 50% of the FLOPs: {meta['share']:.3f}), "
             f"the logits layer ignored; fine-tuning on {meta['train']} training images for "
             f"{meta['epochs']} epochs in total (Adam, lr 1e-3, batch 128), same data order everywhere. "
             "Iterative: 3 prune -> train rounds compounding to the same width.", "",
             "| variant | rounds | FLOPs / dense | accuracy after prune (no training) | accuracy after fine-tune | "
             "drop vs dense | minutes | measured |", "|---|---|---|---|---|---|---|---|"]
    for name in VARIANTS:
        if name not in state:
            continue
        r = state[name]
        before = "-" if r["accuracy_before_finetune"] is None else f"{r['accuracy_before_finetune']:.2f}"
        lines.append(f"| {name} | {r['rounds']} | {r['flops_share']:.3f} | {before} | {r['accuracy']:.2f} | "
                     f"{meta['dense'] - r['accuracy']:+.2f} | {r['minutes']:.1f} | {r['date']} |")
    lines += ["", "Target (issue 12): drop <= 1 point at 50% of the FLOPs removed.",
              f"Machine: {platform.processor() or platform.machine()}, shared 2 cores (load average "
              f"{os.getloadavg()[0]:.1f} when written); torch {torch.__version__}. Reproduce: "
              f"`python bench/pruning_accuracy.py --epochs {meta['epochs']} --train {meta['train']}`.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--train", type=int, default=20_000)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    torch.set_num_threads(2)
    train, test = head(fashion_mnist("train"), args.train), fashion_mnist("test")
    state: dict[str, Any] = json.loads(STATE.read_text()) if STATE.is_file() else {}
    ratio, share = half_flops_ratio(pretrained_fashion_cnn(), test.tensors[0][:1])
    state["meta"] = {"dense": 100 * accuracy(pretrained_fashion_cnn(), test), "ratio": ratio, "share": share,
                     "epochs": args.epochs, "train": args.train}
    for name in args.variants.split(","):
        state[name] = run(name, ratio, args.epochs, train, test)
        print(name, state[name])
        STATE.write_text(json.dumps(state, indent=1))
        DOC.write_text(render(state))
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
