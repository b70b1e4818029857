"""Channel pruning to half the FLOPs: every importance criterion, one-shot vs iterative.

Two models. ``fashion_cnn`` (pretrained in-project) and ``mobilenet``: MobileNetV2 with ImageNet
weights and the Fashion-MNIST transfer probe of ASSETS.md section 3.3 (frozen features, linear
head fitted on 5,000 training images, 96 px; ``torchslim.zoo.mobilenet``). Each is pruned with
``pruning.channel`` at the smallest ratio (step 0.01) that removes at least 50% of its FLOPs, the
logits layer ignored, then fine-tuned; every variant gets the same number of fine-tuning steps
and the same data order. One-shot: one prune, then ``--epochs`` of training. Iterative: three
prune -> train rounds at the per-round ratio that compounds to the same channel count, each with
a third of the steps. Test accuracy on the 10k test images.

For MobileNetV2 the whole pruned network (trunk and head) is fine-tuned on the probe's training
images; since the dense reference is a frozen-feature probe, the ``dense-finetuned`` row gives
the dense network the same fine-tuning, so a drop can be read against both.

A ``kd-<criterion>`` variant also distils (``distillation.logits``, T = 2, alpha = 0.5) from the
dense network fine-tuned with the same budget (run ``dense-finetuned`` first: it keeps its weights).

Run: python bench/pruning_accuracy.py [--model fashion_cnn|mobilenet] [--epochs 2] [--train 20000]
[--variants l2,taylor,...] [--before-test N]. Results merge into docs/benchmarks/pruning-accuracy.md (so variants
can run separately); each model keeps its own JSON state.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import torchslim as ts
from torchslim.distillation import LogitDistillationConfig
from torchslim.measure.flops import count_flops
from torchslim.pruning import ChannelPruningConfig
from torchslim.recipes import Recipe, Stage, TrainSpec
from torchslim.zoo import accuracy, cache_dir, fashion_mnist, head, loader, mobilenet, pretrained_fashion_cnn

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "pruning-accuracy.md"
CRITERIA = ("l1", "l2", "taylor", "entropy", "bn_scale", "apoz")
KD_TEMPERATURE, KD_ALPHA = 2.0, 0.5  # the kd- variants' soft targets (the common defaults, not tuned)
VARIANTS = ["dense-finetuned", *CRITERIA, *(f"iterative-{c}" for c in ("l2", "taylor"))]


@dataclasses.dataclass(frozen=True)
class Setting:
    """What differs between the two models."""

    title: str
    build: Callable[[], torch.nn.Module]
    data: Callable[[str, int | None], Any]
    ignore: tuple[str, ...]  # the logits keep their width
    lr: float
    batch: int
    first_ratio: float  # where the search for the half-FLOPs ratio starts
    state: Path
    flags: str  # extra reproduce flags
    notes: str = ""


def _fashion(split: str, n: int | None) -> Any:
    return head(fashion_mnist(split), n)


def _probe(split: str, n: int | None) -> Any:
    return mobilenet.fashion_probe_data(split, n)


SETTINGS = {
    "fashion_cnn": Setting("fashion_cnn", pretrained_fashion_cnn, _fashion, ("classifier.3",), 1e-3, 128, 0.20,
                           DOC.with_suffix(".json"), ""),
    "mobilenet": Setting("MobileNetV2 (ImageNet weights), Fashion-MNIST transfer probe at 96 px",
                         mobilenet.mobilenet_probe_model, _probe, ("classifier.1",), 3e-4, 64, 0.30,
                         DOC.with_name("pruning-accuracy-mobilenet.json"), " --model mobilenet",
                         "Notes: the whole network (trunk, BatchNorm statistics and the probe's linear head) is "
                         "fine-tuned with cross-entropy on the probe's training images; the dense reference is the "
                         "frozen-feature probe, and `dense-finetuned` gives the unpruned network the same fine-tuning "
                         "as a control. Uniform channel pruning of MobileNetV2 (every group, including the "
                         "depthwise blocks and the residual chains, loses the same share) leaves the probe at chance "
                         "before fine-tuning, so the result is set by the fine-tuning budget. On 2 cores shared at a "
                         "load average of about 9, the budget of the criteria table was one pass over 2,000 "
                         "training images (31 steps of 64), scored on the first 2,000 test images: the target is "
                         "missed by far for every criterion, and even the unpruned control loses 8.6 points. The "
                         "rows named `..., N epochs` (run with `--extra --epochs N`) show it is the budget: with 3 "
                         "epochs the control is back to 85.80 and l1 rises from 65.35 to 79.10. Not tried for lack "
                         "of CPU time: the full 5,000-image probe set for many epochs for every criterion, "
                         "distillation from the dense probe, refitting the linear probe on the pruned features, "
                         "non-uniform per-layer ratios. The rows `..., 3 epochs on 10,000 images` (run with "
                         "`--extra --epochs 3 --train 10000 --test 2000`) give l1 and the control a budget that "
                         "fits: 470 steps of 64 on the first 10,000 training images, scored on the same first "
                         "2,000 test images as the dense probe. There l1 at half the FLOPs reaches 88.35%, 2.2 points above "
                         "the dense probe (the issue's reference) but 2.7 below the dense network fine-tuned the same "
                         "way (91.05%): the target holds against the probe, not against the same-budget control."),
}


def _ctx(s: Setting, train: Any, test: Any, seed: int = 0, teacher: torch.nn.Module | None = None) -> ts.Context:
    calib = list(train.tensors[0][:512].split(64))
    return ts.Context(example_inputs=test.tensors[0][:1], calib_data=calib, teacher=teacher,
                      train_data=loader(train, s.batch, shuffle=True, seed=seed), seed=seed, progress=False)


def _teacher_path(s: Setting, epochs: float, n_train: int) -> Path:
    """Where the dense-finetuned run of this budget keeps its weights (the ``kd-`` variants' teacher)."""
    return cache_dir() / "bench" / f"{s.state.stem}-dense-{epochs:g}ep-{n_train}.safetensors"


def _teacher(s: Setting, epochs: float, n_train: int) -> torch.nn.Module:
    from safetensors.torch import load_file

    path = _teacher_path(s, epochs, n_train)
    if not path.is_file():
        raise SystemExit(f"kd- variants distil from the dense-finetuned run of the same budget; run "
                         f"--variants dense-finetuned with these --epochs/--train first ({path} is missing)")
    teacher = s.build()
    teacher.load_state_dict(load_file(str(path)))
    return teacher.eval()


def half_flops_ratio(s: Setting, x: torch.Tensor) -> tuple[float, float]:
    """The smallest ratio (step 0.01) whose pruned model has <= 50% of the FLOPs, and that share."""
    base = count_flops(s.build(), x)
    for r in [i / 100 for i in range(round(100 * s.first_ratio), 60)]:
        out = ts.apply(s.build(), ChannelPruningConfig(ratio=r, ignore=s.ignore), ts.Context(example_inputs=x)).model
        share = count_flops(out, x) / base
        if share <= 0.5:
            return r, share
    raise RuntimeError("no ratio below 0.6 halves the FLOPs")


def run(s: Setting, variant: str, ratio: float, epochs: float, train: Any, test: Any,
        before_test: int | None = None) -> dict[str, Any]:
    iterative = variant.startswith("iterative-")
    dense = variant == "dense-finetuned"
    kd = variant.startswith("kd-")  # distilled from the dense network fine-tuned with the same budget
    importance = variant.removeprefix("iterative-").removeprefix("kd-")
    rounds = 3 if iterative else 1
    per_round = 0.0 if dense else 1 - (1 - ratio) ** (1 / rounds)
    steps = int(epochs * math.ceil(len(train) / s.batch))
    methods: tuple[Any, ...] = () if dense else (
        ChannelPruningConfig(ratio=per_round, importance=importance, ignore=s.ignore),)
    teacher = _teacher(s, epochs, len(train)) if kd else None
    if kd:
        methods += (LogitDistillationConfig(temperature=KD_TEMPERATURE, alpha=KD_ALPHA),)
    stages = tuple(Stage(name=f"prune{i}", methods=methods,
                         train=TrainSpec(steps=steps // rounds, lr=s.lr, batch_size=s.batch)) for i in range(rounds))
    model = s.build()
    x = test.tensors[0][:1]
    base_flops = count_flops(model, x)
    started = time.perf_counter()
    result = ts.compress(model, Recipe(stages=stages, measure=()), _ctx(s, train, test, teacher=teacher))
    if dense:
        from safetensors.torch import save_file

        path = _teacher_path(s, epochs, len(train))
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in result.model.state_dict().items()}, str(path))
    row = {"variant": variant, "ratio_per_round": round(per_round, 4), "rounds": rounds,
           "flops_share": count_flops(result.model, x) / base_flops,
           "accuracy": 100 * accuracy(result.model, test, batch_size=500),
           "minutes": (time.perf_counter() - started) / 60, "date": time.strftime("%Y-%m-%d %H:%M"),
           "epochs": epochs}
    row["accuracy_before_finetune"] = None
    if not iterative and not dense:
        one_shot = ts.apply(s.build(), ChannelPruningConfig(ratio=ratio, importance=importance, ignore=s.ignore),
                            _ctx(s, train, test)).model
        row["accuracy_before_finetune"] = 100 * accuracy(one_shot, test, batch_size=500, limit=before_test)
    return row


def len_test(meta: dict[str, Any]) -> str:
    return "all 10,000" if meta.get("test") is None else f"the first {meta['test']:,}"


def render(s: Setting, state: dict[str, Any]) -> str:
    meta = state["meta"]
    before_on = "" if meta.get("before_test") is None else f" (first {meta['before_test']:,} test images)"
    lines = [f"# Channel pruning to half the FLOPs: criteria and schedules ({s.title})", "",
             f"Dense model: test accuracy {meta['dense']:.2f}% (on {len_test(meta)} test images). "
             f"`pruning.channel` at ratio "
             f"{meta['ratio']:.2f} (the smallest that leaves <= 50% of the FLOPs: {meta['share']:.3f}), "
             f"the logits layer ignored; fine-tuning on {meta['train']} training images for "
             f"{meta['epochs']} epochs in total (Adam, lr {s.lr:g}, batch {s.batch}, cosine), same data order "
             "everywhere. Iterative: 3 prune -> train rounds compounding to the same width.", "",
             f"| variant | rounds | FLOPs / dense | accuracy after prune, no training{before_on} | epochs | training images | "
             "accuracy after fine-tune | drop vs dense | drop vs dense fine-tuned (same budget) | minutes | measured |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    extras = [k for k in state if k != "meta" and k not in VARIANTS]
    for name in [v for v in VARIANTS if v in state] + extras:
        r = state[name]
        # an extra row ("l1, 3 epochs on 10,000 images") is compared with the control of its own budget
        budget = name.partition(",")[2]
        control = state.get("dense-finetuned" + (f",{budget}" if budget else ""))
        before = "-" if r["accuracy_before_finetune"] is None else f"{r['accuracy_before_finetune']:.2f}"
        versus = "-" if control is None else f"{control['accuracy'] - r['accuracy']:+.2f}"
        lines.append(f"| {name} | {r['rounds']} | {r['flops_share']:.3f} | {before} | {r.get('epochs', meta['epochs']):g} "
                     f"| {r.get('train', meta['train']):,} | {r['accuracy']:.2f} | "
                     f"{meta['dense'] - r['accuracy']:+.2f} | {versus} | {r['minutes']:.1f} | {r['date']} |")
    lines += ["", *([s.notes, ""] if s.notes else []), "Target (issue 12): drop <= 1 point at 50% of the FLOPs removed.",
              f"Machine: {platform.processor() or platform.machine()}, shared 2 cores (load average "
              f"{os.getloadavg()[0]:.1f} when written); torch {torch.__version__}. Reproduce: "
              f"`python bench/pruning_accuracy.py{s.flags} --epochs {meta['epochs']} --train {meta['train']}"
              + ("" if meta.get("test") is None else f" --test {meta['test']}")
              + ("" if meta.get("before_test") is None else f" --before-test {meta['before_test']}") + "`.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SETTINGS), default="fashion_cnn")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--train", type=int, default=20_000)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--extra", action="store_true",
                        help="keep the table's settings; store these runs as extra rows named by their epochs")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--test", type=int, default=None, help="score on the first N test images (default all)")
    parser.add_argument("--before-test", type=int, default=None,
                        help="score the un-fine-tuned one-shot models on only the first N test images")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    s = SETTINGS[args.model]
    train, test = s.data("train", args.train), s.data("test", args.test)
    state: dict[str, Any] = json.loads(s.state.read_text()) if s.state.is_file() else {}
    ratio, share = half_flops_ratio(s, test.tensors[0][:1])
    known = state.get("meta", {})
    if args.extra:
        for name in args.variants.split(","):
            key = f"{name}, {args.epochs:g} epochs" + (f" on {args.train:,} images" if args.train != known["train"] else "")
            state[key] = {**run(s, name, known["ratio"], args.epochs, train, test, known.get("before_test")),
                          "train": args.train}
            print(key, state[key], flush=True)
            s.state.write_text(json.dumps(state, indent=1))
        DOC.write_text("\n".join(render(t, json.loads(t.state.read_text()))
                                 for t in SETTINGS.values() if t.state.is_file()))
        return
    dense = known["dense"] if known.get("test") == args.test and "dense" in known else \
        100 * accuracy(s.build(), test, batch_size=500)
    state["meta"] = {"dense": dense, "ratio": ratio, "share": share, "epochs": args.epochs, "train": args.train,
                     "test": args.test, "before_test": args.before_test}
    for name in args.variants.split(","):
        state[name] = run(s, name, ratio, args.epochs, train, test, args.before_test)
        print(name, state[name], flush=True)
        s.state.write_text(json.dumps(state, indent=1))
        DOC.write_text("\n".join(render(t, json.loads(t.state.read_text()))
                                 for t in SETTINGS.values() if t.state.is_file()))
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
