"""all-MiniLM-L6-v2: 25% and 50% of the attention heads removed by pruning.heads, l1 vs taylor.

Calibration (taylor): 256 Lee background sentences (training text, never evaluation). Measures:
encode latency (batch 8 x 128 tokens, alternating with the original, median of rounds), mean
embedding cosine to the original on the 200 MR sentences, Lee Pearson, WS-353 and SimLex. No
fine-tuning.

Run: flock /tmp/torchslim-bench.lock python bench/pruning_heads_minilm.py   (about 6 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import time
from pathlib import Path

import torch

import torchslim as ts
from torchslim.pruning import HeadPruningConfig
from torchslim.zoo import minilm

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "pruning_heads.md"
START, END = "<!-- heads -->", "<!-- /heads -->"


def calibration(tok: object, n: int = 256, batch: int = 32) -> list[dict[str, torch.Tensor]]:
    return minilm.token_batches(tok, list(minilm.lee_background_sentences()[:n]), batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    args = parser.parse_args()
    torch.set_num_threads(2)
    tok, original = minilm.load_minilm_tokenizer(), minilm.load_minilm()
    reference = minilm.encode(original, tok, minilm.mr_sentences())
    calib = calibration(tok)
    params = sum(p.numel() for p in original.parameters())
    rows = {"original": {**minilm.evaluate_minilm(original, tok), "mr_cosine": 1.0, "speedup": 1.0,
                         "seconds": 0.0, "params": params, "heads": 72}}
    for ratio in args.ratios:
        for importance, scope in (("l1", "layer"), ("taylor", "layer"), ("taylor", "global")):
            cfg = HeadPruningConfig(ratio=ratio, importance=importance, scope=scope, calib_batches=8)  # type: ignore[arg-type]
            model = copy.deepcopy(original)
            started = time.perf_counter()
            out = ts.apply(model, cfg, ts.Context(calib_data=calib))
            seconds = time.perf_counter() - started
            model, stats = out.model.eval(), out.record.outcomes[0].stats
            name = f"{ratio:.0%} {importance} {scope}"
            rows[name] = {**minilm.evaluate_minilm(model, tok), "mr_cosine": minilm.mr_fidelity(model, tok, reference),
                          "speedup": minilm.encode_speedup(original, model, tok), "seconds": seconds,
                          "params": sum(p.numel() for p in model.parameters()),
                          "heads": int(stats["heads"] - stats["heads_removed"])}
            print(name, rows[name], flush=True)
    lines = [START, "## all-MiniLM-L6-v2: attention heads removed, no fine-tuning", "",
             f"6 layers x 12 heads of 32 (hidden 384); {params:,} parameters before. `layer` removes the "
             "ratio from every layer, `global` ranks all 72 heads together (each layer keeps one). "
             "Calibration for taylor: 256 Lee background sentences (8 batches of 32).", "",
             "| model | heads | params | encode speed-up | MR cosine to original | Lee Pearson | WS-353 | SimLex | method s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['heads']} | {r['params']:,} | {r['speedup']:.2f}x | {r['mr_cosine']:.3f} | "
                     f"{r['lee_pearson']:.3f} | {r['ws353']:.3f} | {r['simlex']:.3f} | {r['seconds']:.1f} |")
    lines += ["", "Reproduce: `flock /tmp/torchslim-bench.lock python bench/pruning_heads_minilm.py`. Machine: "
              f"{platform.processor() or platform.machine()}, 2 threads, shared (load average "
              f"{os.getloadavg()[0]:.1f}); torch {torch.__version__}. Speed-up: original / pruned latency "
              "at batch 8 x 128 tokens, measured alternately, median of 5 rounds.", END]
    text = DOC.read_text() if DOC.is_file() else "# Attention-head pruning\n\n"
    if START in text:
        text = text[:text.index(START)] + "\n".join(lines) + text[text.index(END) + len(END):]
    else:
        text += "\n".join(lines) + "\n"
    DOC.write_text(text)
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
