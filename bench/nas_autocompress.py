"""nas.autocompress vs the best uniform ratio at the same FLOPs budget (fashion_cnn, MobileNetV2).

``--model fashion_cnn``: the search judges candidates on 2,000 held-out *training* images (never
the test set); the chosen per-layer ratios and the best uniform ratio within the budget are then
scored on the 10k test images, right after pruning, as AMC does, and after the same short fine-tune.

``--model resnet18``: the same protocol on torchvision's ResNet-18 (1-channel 7x7 stem), trained
here from scratch for 2 epochs on the 60k training images (no pretrained ResNet-18 installs
offline; cached); each basic block's inner width (``layerN.M.conv1``) gets its own ratio.
For both, each candidate, and the uniform baseline, gets BatchNorm statistics recomputed on
``--bn-batches`` calibration batches before it is judged (0: keep the unpruned model's).

``--model mobilenet``: MobileNetV2 (ImageNet weights) and its Fashion-MNIST linear probe (ASSETS.md
3.3, 96 px). Each expanded block (2-17) gets one ratio for its hidden width (``group_by``: the
expansion and depthwise convs that produce it, and the projection's inputs). The probe is a frozen-
feature classifier, so a candidate is judged the way the probe is made: the linear head is
refitted (logistic regression) on the pruned features of 2,000 training images (``--search-images``) and scored on
1,000 other training images (5,000-5,999); the chosen and the best uniform setting are then
refitted on the probe's 5,000 training images and scored on 2,000 test images.

Run: python bench/nas_autocompress.py [--model fashion_cnn|resnet18|mobilenet] [--budget 0.5] [--trials 40] [--epochs 1]
     [--bn-batches 4]
Each model writes its own section of docs/benchmarks/nas-autocompress.md.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _sections import write_section
from torch.utils.data import TensorDataset

import torchslim as ts
from torchslim.core.batchnorm import recalibrate_batchnorm
from torchslim.measure.flops import count_flops
from torchslim.nas import AutoCompressConfig
from torchslim.pruning import ChannelPruningConfig
from torchslim.recipes import Recipe, Stage, TrainSpec
from torchslim.train import fit
from torchslim.zoo import accuracy, fashion_mnist, head, loader, mobilenet, pretrained_fashion_cnn
from torchslim.zoo.pretrained import cache_dir

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "nas-autocompress.md"
TITLE = "# nas.autocompress vs the best uniform pruning ratio at the same FLOPs"
# each inverted residual's hidden width: its expansion and depthwise convs (both produce those channels)
MOBILENET_HIDDEN = (r"re:features\.([2-9]|1\d)\.conv\.[01]\.0$",)  # blocks 2-17 (block 1 has no expansion)
MOBILENET_BLOCK = r"features\.(\d+)\."  # one ratio per block


def resnet18_fashion() -> torch.nn.Module:
    """torchvision ResNet-18, 1-channel stem, trained from scratch on the 60k Fashion-MNIST images
    (2 epochs, Adam 2e-3, cosine; no pretrained ResNet-18 installs offline); cached."""
    from safetensors.torch import load_file, save_file
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=10)
    model.conv1 = torch.nn.Conv2d(1, 64, 7, stride=2, padding=3, bias=False)
    path = cache_dir() / "bench" / "resnet18_fashion_2ep.safetensors"
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    print("training ResNet-18 on Fashion-MNIST (2 epochs, cached afterwards)")
    fit(model, TrainSpec(epochs=2, lr=2e-3, batch_size=128), [],
        ts.Context(train_data=loader(fashion_mnist("train"), 128, shuffle=True, seed=0), seed=0, progress=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(path))
    return model.eval()


MODELS: dict[str, tuple[Callable[[], torch.nn.Module], dict[str, Any]]] = {  # factory, AutoCompressConfig fields
    "fashion_cnn": (pretrained_fashion_cnn, {"ignore": ("classifier.3",)}),
    "resnet18": (resnet18_fashion, {"targets": (r"re:layer\d\.\d\.conv1$",)}),  # each block's inner width
}


def best_uniform(make: Callable[[], torch.nn.Module], fields: dict[str, Any], budget: float,
                 ctx: ts.Context) -> tuple[float, torch.nn.Module]:
    """The smallest uniform ratio (to 0.01) whose pruned model meets ``budget`` FLOPs, and that model.

    It keeps the most channels any uniform setting within the budget keeps: the uniform baseline
    is not limited to the search's coarse grid of ratios.
    """
    def pruned(hundredths: int) -> tuple[torch.nn.Module, bool]:
        model = ts.apply(make(), ChannelPruningConfig(ratio=hundredths / 100, **fields), ctx).model
        return model, count_flops(model, ctx.example_inputs) <= budget

    low, high = 0, 90
    best, fits = pruned(high)
    assert fits, "no uniform ratio up to 0.9 meets the budget"
    while high - low > 1:  # FLOPs fall as the ratio grows
        middle = (low + high) // 2
        model, fits = pruned(middle)
        if fits:
            high, best = middle, model
        else:
            low = middle
    return high / 100, best


def classifier_rows(args: argparse.Namespace) -> list[str]:
    make, fields = MODELS[args.model]
    full = fashion_mnist("train")
    held = TensorDataset(full.tensors[0][-2000:], full.tensors[1][-2000:])
    train, test = head(full, 20_000), fashion_mnist("test")
    x = test.tensors[0][:1]
    ctx = ts.Context(example_inputs=x, calib_data=list(train.tensors[0][:256].split(64)), seed=0,
                     progress=False, eval_fn=lambda m: {"accuracy": accuracy(m, held)},
                     train_data=loader(train, 128, shuffle=True, seed=0))
    base = count_flops(make(), x)
    ratios = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75)
    started = time.perf_counter()
    searched = ts.compress(make(), Recipe.single(AutoCompressConfig(
        ratios=ratios, budget={"flops": args.budget}, trials=args.trials, bn_batches=args.bn_batches, **fields)), ctx)
    minutes = (time.perf_counter() - started) / 60
    outcome = searched.record.outcomes[0]
    uniform = best_uniform(make, fields, args.budget * base, ctx)
    if args.bn_batches:  # the same BatchNorm statistics the search gave its result
        recalibrate_batchnorm(uniform[1], ctx.calib_data[: args.bn_batches], "bench")  # type: ignore[index]
    rows = {"searched per-layer ratios": searched.model, f"uniform ratio {uniform[0]}": uniform[1]}
    what = ("ResNet-18 (torchvision, 1-channel stem, trained here 2 epochs on 60k: no pretrained weights "
            "install offline); one ratio per block's inner width (`layerN.M.conv1`)"
            if args.model == "resnet18" else "fashion_cnn")
    fresh = (f"BatchNorm statistics of both recomputed on {args.bn_batches} calibration batches of 64 training "
             "images before they are judged (`bn_batches`); " if args.bn_batches else
             "BatchNorm statistics kept from the unpruned model (`bn_batches: 0`); ")
    lines = [f"## {what}", "",
             f"Budget: {args.budget:.2f} of the original FLOPs; `pruning.channel` (l2) applied per layer by "
             "key; " + fresh +
             f"{args.trials} TPE trials ({minutes:.1f} min) judged on 2,000 held-out training images; test accuracy "
             f"on 10k images (original {100 * accuracy(make(), test):.2f}%). Fine-tune: {args.epochs} "
             "epoch(s) "
             "on 20k images, Adam lr 1e-3, the same for both"
             + (f"; mean ± standard deviation over {args.ft_seeds} fine-tuning seeds (data order and "
                "initial state of the random generators)." if args.ft_seeds > 1 else "."), "",
             "| variant | FLOPs share | test accuracy, no fine-tune | after fine-tune |", "|---|---|---|---|"]
    scores: list[tuple[float, float]] = []
    spreads: list[float] = []
    stage = Stage(name="ft", methods=(), train=TrainSpec(epochs=args.epochs, lr=1e-3, batch_size=128))
    for name, model in rows.items():
        share = count_flops(model, x) / base
        before = 100 * accuracy(model, test)
        runs = []
        for seed in range(args.ft_seeds):
            tuned = ts.compress(copy.deepcopy(model), Recipe(stages=(stage,), measure=()), dataclasses.replace(
                ctx, seed=seed, train_data=loader(train, 128, shuffle=True, seed=seed))).model
            runs.append(100 * accuracy(tuned, test))
            print(name, "fine-tuning seed", seed, runs[-1], flush=True)
        after, spread = statistics.fmean(runs), (statistics.stdev(runs) if len(runs) > 1 else 0.0)
        shown = f"{after:.2f} ± {spread:.2f} ({', '.join(f'{r:.2f}' for r in runs)})" if len(runs) > 1 \
            else f"{after:.2f}"
        lines.append(f"| {name} | {share:.3f} | {before:.2f} | {shown} |")
        scores.append((before, after))
        spreads.append(spread)
        print(name, share, before, runs)
    seed_error = math.sqrt(sum(v**2 for v in spreads) / args.ft_seeds)  # standard error of the gap of the means
    chosen = ", ".join(f"{f}: {v['ratio']}" for f, v in outcome.layers.items())
    lines += ["", f"Chosen ratios: {chosen}. Search: {outcome.stats['trials']:.0f} trials, "
              f"{outcome.stats['feasible']:.0f} within budget, {outcome.stats['seconds']:.0f} s; held-out "
              f"accuracy {100 * outcome.stats['best_score']:.2f}% vs best uniform ratio of the search's grid "
              f"{100 * outcome.stats['best_uniform_score']:.2f}%. The uniform row is the smallest uniform ratio "
              "(to 0.01) within the budget, found by bisection: it keeps the most channels any uniform setting "
              "can.",
              "Target (issue 17): searched per-layer settings beat the best uniform setting at the same budget: "
              + "; ".join(f"{when}: **{_verdict(ours, theirs, len(test), extra)}** ({ours:.2f} vs {theirs:.2f})"
                          for when, ours, theirs, extra in zip(("no fine-tune", "after fine-tune"), *scores,
                                                               (0.0, seed_error)))
              + f" (met needs a gap above two standard errors: of a score on {len(test):,} images"
              + (", combined with the spread over fine-tuning seeds" if args.ft_seeds > 1 else "") + ").",
              f"Machine: {platform.processor() or platform.machine()}, shared 2 cores (load average "
              f"{os.getloadavg()[0]:.1f}); torch {torch.__version__}. Reproduce: "
              f"`python bench/nas_autocompress.py --model {args.model} --budget {args.budget} --trials {args.trials} "
              f"--bn-batches {args.bn_batches} --epochs {args.epochs}"
              + (f" --ft-seeds {args.ft_seeds}" if args.ft_seeds > 1 else "") + "`."]
    return lines


def _verdict(ours: float, theirs: float, images: int, extra: float = 0.0) -> str:
    """``met`` when ``ours`` (percent) beats ``theirs`` by more than two standard errors: the binomial
    one of a score on ``images``, combined with ``extra`` (e.g. the spread over fine-tuning seeds)."""
    error = math.hypot(100 * math.sqrt(theirs / 100 * (1 - theirs / 100) / images), extra)
    return "met" if ours - theirs > 2 * error else "not met"



def _probe_score(model: torch.nn.Module, fit: torch.Tensor, fit_labels: torch.Tensor, score: torch.Tensor,
                 score_labels: torch.Tensor) -> float:
    """Refit the probe's linear head on ``model``'s features of ``fit``; accuracy on ``score``."""
    from sklearn.linear_model import LogisticRegression

    with torch.inference_mode():
        embed = [torch.cat([model.embed(x[i:i + 250]) for i in range(0, len(x), 250)]).numpy() for x in (fit, score)]
    clf = LogisticRegression(max_iter=1000, random_state=0).fit(embed[0], fit_labels.numpy())
    return float((clf.predict(embed[1]) == score_labels.numpy()).mean())


def mobilenet_rows(args: argparse.Namespace) -> list[str]:
    fit_n, held_n = args.search_images
    images, labels = mobilenet.fashion_probe_data("train", 5000 + held_n).tensors
    test_images, test_labels = mobilenet.fashion_probe_data("test", args.test_images).tensors
    x = test_images[:1]

    def held_out(m: torch.nn.Module) -> dict[str, float]:  # held-out: training images 5000.. (not the head's)
        return {"accuracy": _probe_score(m, images[:fit_n], labels[:fit_n], images[5000:], labels[5000:])}

    def test_score(m: torch.nn.Module) -> float:
        return 100 * _probe_score(m, images[:5000], labels[:5000], test_images, test_labels)

    ctx = ts.Context(example_inputs=x, seed=0, progress=False, eval_fn=held_out)
    original = mobilenet.mobilenet_probe_model()
    base = count_flops(original, x)
    ratios = tuple(round(args.step * i, 4) for i in range(int(args.max_ratio / args.step + 1e-9) + 1))
    started = time.perf_counter()
    searched = ts.compress(mobilenet.mobilenet_probe_model(), Recipe.single(AutoCompressConfig(
        ratios=ratios, budget={"flops": args.budget}, trials=args.trials, targets=MOBILENET_HIDDEN,
        group_by=MOBILENET_BLOCK, bn_batches=0)), ctx)  # no calibration data: the probe's images only
    minutes = (time.perf_counter() - started) / 60
    outcome = searched.record.outcomes[0]
    uniform = best_uniform(mobilenet.mobilenet_probe_model, {"targets": MOBILENET_HIDDEN}, args.budget * base, ctx)
    lines = ["## MobileNetV2 (ImageNet weights), Fashion-MNIST probe at 96 px", "",
             f"Budget: {args.budget:.2f} of the original FLOPs; `pruning.channel` (l2) applied by key to each "
             f"of the 16 expanded hidden widths (expansion and depthwise conv of blocks 2-17, one ratio per block: "
             f"`group_by: {MOBILENET_BLOCK}`); {args.trials} TPE trials "
             f"over ratios {list(ratios)} ({minutes:.1f} min), each judged by refitting the linear probe on the "
             f"pruned features of {fit_n:,} training images and scoring {held_n:,} other training images "
             "(5,000 onwards). Test: the probe refitted on the 5,000 "
             f"probe training images, {args.test_images:,} test images (original {test_score(original):.2f}%). "
             "No fine-tuning.",
             "", "| variant | FLOPs share | held-out accuracy (search) | test accuracy |", "|---|---|---|---|"]
    tested = []
    for name, model, held in (("searched per-layer ratios", searched.model, outcome.stats["best_score"]),
                              (f"uniform ratio {uniform[0]}", uniform[1], held_out(uniform[1])["accuracy"])):
        tested.append(test_score(model))
        lines.append(f"| {name} | {count_flops(model, x) / base:.3f} | {100 * held:.2f} | {tested[-1]:.2f} |")
        print(lines[-1])
    error = 100 * math.sqrt(tested[1] / 100 * (1 - tested[1] / 100) / args.test_images)  # binomial
    verdict = _verdict(tested[0], tested[1], args.test_images)
    lines += ["", f"Target (issue 17): searched per-layer settings beat the best uniform setting at the same "
              f"budget: **{verdict}** (test {tested[0]:.2f} vs {tested[1]:.2f}; one standard error of a score on "
              f"{args.test_images:,} images is about {error:.1f} points, and met needs more than two)."]
    chosen = ", ".join(f"{f.split('.')[1]}: {v['ratio']}" for f, v in outcome.layers.items() if ".conv.1.0" in f)
    lines += ["", f"Chosen ratios (block: ratio): {chosen}. Search: {outcome.stats['trials']:.0f} trials, "
              f"{outcome.stats['feasible']:.0f} within budget; best uniform ratio of the search's grid on the "
              f"held-out images {100 * outcome.stats['best_uniform_score']:.2f}%. The uniform row is the smallest "
              "uniform ratio (to 0.01) within the budget, found by bisection.",
              f"Machine: {platform.processor() or platform.machine()}, shared 2 cores (load average "
              f"{os.getloadavg()[0]:.1f}); torch {torch.__version__}. Reproduce: "
              f"`python bench/nas_autocompress.py --model mobilenet --budget {args.budget} --trials {args.trials} "
              f"--step {args.step} --max-ratio {args.max_ratio} --search-images {fit_n} {held_n} "
              f"--test-images {args.test_images}`."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=(*MODELS, "mobilenet"), default="fashion_cnn")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs (fashion_cnn, resnet18)")
    parser.add_argument("--step", type=float, default=0.125, help="ratio grid step (mobilenet)")
    parser.add_argument("--search-images", type=int, nargs=2, default=(2000, 1000), metavar=("FIT", "HELD"),
                        help="mobilenet: images the search refits the probe on, and scores on")
    parser.add_argument("--max-ratio", type=float, default=0.75, help="largest ratio of the grid (mobilenet)")
    parser.add_argument("--test-images", type=int, default=2000, help="mobilenet: test images scored")
    parser.add_argument("--ft-seeds", type=int, default=1,
                        help="fashion_cnn, resnet18: fine-tune each variant with this many seeds (mean ± sd)")
    parser.add_argument("--bn-batches", type=int, default=4,
                        help="fashion_cnn, resnet18: calibration batches for fresh BatchNorm statistics (0: keep)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    lines = mobilenet_rows(args) if args.model == "mobilenet" else classifier_rows(args)
    key = args.model if args.budget == 0.5 else f"{args.model}-{args.budget:g}"  # a section per model and budget
    if args.model != "mobilenet" and args.bn_batches:
        key += f"-bn{args.bn_batches}"
    if args.model != "mobilenet" and args.epochs != 1:
        key += f"-ep{args.epochs}"
    if args.model != "mobilenet" and args.ft_seeds > 1:
        key += f"-seeds{args.ft_seeds}"
    if args.model == "mobilenet" and (args.step, tuple(args.search_images)) != (0.125, (2000, 1000)):
        key += f"-step{args.step:g}-{args.search_images[0]}-{args.search_images[1]}"
    if args.model == "mobilenet" and (args.max_ratio, args.test_images) != (0.75, 2000):
        key += f"-max{args.max_ratio:g}-test{args.test_images}"
    start, end = f"<!-- {key} -->", f"<!-- /{key} -->"
    write_section(DOC, [start, *lines, end], start, end, TITLE)


if __name__ == "__main__":
    main()
