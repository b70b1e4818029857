"""all-MiniLM-L6-v2: both FFN Linears of every layer at the same rank, lowrank.drone vs lowrank.svd.

Calibration: 512 Lee background sentences (training text, never evaluation). Measures: encode
latency (batch 8 x 128 tokens, alternating with the original, median of rounds), mean embedding
cosine to the original on the 200 MR sentences, Lee Pearson, WS-353 and SimLex.

Run: python bench/lowrank_minilm.py [--rank 96]   (about 3 minutes on 2 cores)

Second section (``--distill-minutes 30``): DRONE with the rank of each layer chosen from the
calibration data (one ``energy`` share of the data-aware spectrum of ``W L`` for every layer,
the largest whose FFN multiply-adds fit the budget of the equal-rank row), then distilled from
the original on Lee background sentences (bench/_minilm_distill.py) within the given minutes.
Wall-clock budget: run it under the shared lock,
``flock /tmp/torchslim-bench.lock python bench/lowrank_minilm.py --distill-minutes 30``.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import re
import time
from pathlib import Path

import _minilm_distill as md
import _sections
import torch

import torchslim as ts
from torchslim.lowrank import DroneConfig, SVDConfig
from torchslim.lowrank.drone import input_covariances
from torchslim.zoo import minilm

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "sharing-lowrank.md"
FFN = (r"re:bert\.encoder\.layer\.\d+\.intermediate\.dense", r"re:bert\.encoder\.layer\.\d+\.output\.dense")
START, END = "<!-- lowrank -->", "<!-- /lowrank -->"
DSTART, DEND = "<!-- lowrank-distill -->", "<!-- /lowrank-distill -->"


def calibration(tok: object, n: int = 512, batch: int = 32) -> list[dict[str, torch.Tensor]]:
    return minilm.token_batches(tok, list(minilm.lee_background_sentences()[:n]), batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=96)
    parser.add_argument("--distill-minutes", type=float, default=0.0,
                        help="run the distilled section instead, with this wall-clock budget")
    md.distill_arguments(parser, lr=1e-4)
    parser.add_argument("--note", default="", help="a line of notes for the distilled table")
    parser.add_argument("--explore", action="store_true",
                        help="short look: no speed-up, nothing written")
    parser.add_argument("--dry", action="store_true", help="print, do not write the doc")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.distill_minutes > 0:
        distilled_section(args)
        return
    tok, original = minilm.load_minilm_tokenizer(), minilm.load_minilm()
    reference = minilm.encode(original, tok, minilm.mr_sentences())
    calib = calibration(tok)
    rows = {"original": {**minilm.evaluate_minilm(original, tok), "mr_cosine": 1.0, "speedup": 1.0, "seconds": 0.0}}
    for name, cfg in {"lowrank.svd": SVDConfig(rank=args.rank, targets=FFN),
                      "lowrank.drone": DroneConfig(rank=args.rank, targets=FFN)}.items():
        model = copy.deepcopy(original)
        started = time.perf_counter()
        model = ts.apply(model, cfg, ts.Context(calib_data=calib)).model.eval()
        seconds = time.perf_counter() - started
        rows[name] = {**minilm.evaluate_minilm(model, tok), "mr_cosine": minilm.mr_fidelity(model, tok, reference),
                      "speedup": minilm.encode_speedup(original, model, tok), "seconds": seconds}
        print(name, rows[name])
    params = sum(p.numel() for p in original.parameters())
    lines = [START, "## all-MiniLM-L6-v2: data-aware (DRONE) vs plain SVD at equal rank", "",
             f"Both FFN Linears of all 6 layers (384 -> 1536 -> 384) at rank {args.rank} of 384; {params:,} "
             "parameters before. Calibration for DRONE: 512 Lee background sentences. No fine-tuning.", "",
             "| model | encode speed-up | MR cosine to original | Lee Pearson | WS-353 | SimLex | method s |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['speedup']:.2f}x | {r['mr_cosine']:.3f} | {r['lee_pearson']:.3f} | "
                     f"{r['ws353']:.3f} | {r['simlex']:.3f} | {r['seconds']:.1f} |")
    lines += ["", "Reference (issue 16, measured earlier on this machine): plain SVD 1.56x, cosine 0.47, Lee 0.453; "
              "a simple data-aware output projection 1.45x, cosine 0.71, Lee 0.526, WS 0.696.",
              f"Reproduce: `python bench/lowrank_minilm.py --rank {args.rank}`. Machine: "
              f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, shared (load average "
              f"{os.getloadavg()[0]:.1f}); torch {torch.__version__}. Speed-up: original / factorised latency "
              "at batch 8 x 128 tokens, measured alternately, median of 5 rounds.", END]
    write_section(lines, START, END)


def write_section(lines: list[str], start: str, end: str) -> None:
    """Replace the ``start`` .. ``end`` section of the doc (put it before "See also" when missing)."""
    _sections.write_section(DOC, lines, start, end, "# Weight sharing and low-rank factorisation", "\nSee also")


@torch.no_grad()
def energy_for_budget(model: torch.nn.Module, calib: list, rank: int) -> tuple[float, dict[str, int]]:
    """The largest DRONE ``energy`` whose per-layer ranks (from the calibration spectra of ``W L``)
    cost in total no more FFN multiply-adds than ``rank`` in every layer, and those ranks."""
    layers = {f: m for f, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and re.fullmatch(FFN[0][3:] + "|" + FFN[1][3:], f)}
    covs = input_covariances(model, layers, calib)
    shares = {}
    for fqn, layer in layers.items():
        cov = covs[fqn] + 1e-4 * covs[fqn].diagonal().mean() * torch.eye(covs[fqn].shape[0], dtype=torch.float64)
        values, vectors = torch.linalg.eigh(cov)
        s = torch.linalg.svdvals(layer.weight.double() @ (vectors * values.clamp_min(0).sqrt()))
        shares[fqn] = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
    budget = sum(rank * (m.in_features + m.out_features) for m in layers.values())

    def ranks(energy: float) -> dict[str, int]:
        return {f: int(torch.searchsorted(sh, torch.tensor(energy - 1e-12, dtype=sh.dtype))) + 1
                for f, sh in shares.items()}

    def cost(energy: float) -> int:
        return sum(r * (layers[f].in_features + layers[f].out_features) for f, r in ranks(energy).items())

    low, high = 0.0, 1.0
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if cost(mid) <= budget else (low, mid)
    return low, ranks(low)


def distilled_section(args: argparse.Namespace) -> None:
    tok, original = minilm.load_minilm_tokenizer(), minilm.load_minilm()
    reference = minilm.encode(original, tok, minilm.mr_sentences())
    calib = calibration(tok)
    energy, ranks = energy_for_budget(original, calib, args.rank)
    print(f"energy {energy}: ranks {ranks}", flush=True)
    rows = {"original": {**minilm.evaluate_minilm(original, tok), "mr_cosine": 1.0, "speedup": 1.0}}
    configs = {f"lowrank.drone energy {energy:.4f}": DroneConfig(energy=energy, targets=FFN)}
    for name, cfg in configs.items():
        outcome = ts.apply(copy.deepcopy(original), cfg, ts.Context(calib_data=calib))
        rows[name] = {**md.score(outcome.model.eval(), original, tok, reference, not args.explore), "train": "-"}
        print(name, rows[name], flush=True)
    student = outcome.model
    untrained = copy.deepcopy(student)
    layer_ranks = {f: int(v["rank"]) for f, v in outcome.record.outcomes[0].layers.items() if "rank" in v}
    student, info = md.distill(student, original, tok, args.distill_minutes, args.lr, args.hidden_weight,
                               md.augmentation(args), args.precision)
    name = f"lowrank.drone energy {energy:.4f} + distilled"
    rows[name] = {**md.score(student, original, tok, reference, not args.explore),
                  "train": md.trained(info)}
    if not args.explore:  # the same structure untrained, timed again now: tells drift from change
        rows[name]["speedup_untrained_now"] = minilm.encode_speedup(original, untrained, tok)
    print(name, rows[name], flush=True)
    if not (args.dry or args.explore):
        write_section(distilled_lines(args, rows, energy, layer_ranks), DSTART, DEND)


def distilled_lines(args: argparse.Namespace, rows: dict, energy: float, ranks: dict[str, int]) -> list[str]:
    t = rows["original"]
    short = ", ".join(f"{i}: {ranks.get(f'bert.encoder.layer.{i}.intermediate.dense', '-')}/"
                      f"{ranks.get(f'bert.encoder.layer.{i}.output.dense', '-')}" for i in range(6))
    lines = [DSTART, "## all-MiniLM-L6-v2: DRONE, rank per layer from calibration data, then distilled", "",
             f"Ranks (FFN in / out Linear per layer) from one energy share {energy:.4f} of each layer's "
             f"data-aware spectrum on 512 Lee background sentences, the largest share whose FFN "
             f"multiply-adds in total are at most those of rank {args.rank} everywhere (the table above): {short}. Distillation from the "
             f"original on the 2,573 Lee background sentences ({md.AUGMENTED}; cosine on the sentence embedding + cosine "
             f"on the 6 layers' hidden states, weight {args.hidden_weight:g}; AdamW, cosine schedule), "
             "budget including a timing pass.", "",
             "| model | encode speed-up | MR cosine | Lee Pearson | % of original | WS-353 | % of original "
             "| SimLex | training |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['speedup']:.2f}x | {r['mr_cosine']:.3f} | {r['lee_pearson']:.3f} | "
                     f"{r['lee_pearson'] / t['lee_pearson']:.1%} | {r['ws353']:.3f} | "
                     f"{r['ws353'] / t['ws353']:.1%} | {r['simlex']:.3f} | {r.get('train', '-')} |")
    lines += ["", "Targets (issue 16): >= 1.5x faster, MR cosine >= 0.90, Lee Pearson and WS-353 each >= 95% of "
              "the original's, <= 30 minutes of distillation on 2 cores.", *([args.note] if args.note else []),
              f"Reproduce: `flock /tmp/torchslim-bench.lock python bench/lowrank_minilm.py --rank {args.rank} "
              f"--distill-minutes {args.distill_minutes:g} --lr {args.lr:g}{md.run_flags(args)}`. "
              f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, shared (load average "
              f"{os.getloadavg()[0]:.1f}); torch {torch.__version__}.", DEND]
    return lines


if __name__ == "__main__":
    main()
