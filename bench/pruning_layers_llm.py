"""SmolLM2-135M: remove 25% of the decoder layers by Block Influence; perplexity and speed before/after.

Calibration: the 32 shared windows after the evaluation text (ASSETS.md 3.1); perplexity on the
first 24 windows of 512 tokens. No recovery training here (a distillation stage would follow).

Run: python bench/pruning_layers_llm.py [--ratio 0.25]   (about 3 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

import torchslim as ts
from torchslim.pruning import LayerPruningConfig
from torchslim.zoo import llm

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "pruning-layers-llm.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.25)
    args = parser.parse_args()
    torch.set_num_threads(2)
    tok, model = llm.load_smollm2_tokenizer(), llm.load_smollm2()
    windows, calib = llm.lee_windows(tok, "eval"), list(llm.lee_windows(tok, "calib").split(1))
    rows = []
    for stage in ("dense", "pruned"):
        if stage == "pruned":
            result = ts.apply(model, LayerPruningConfig(ratio=args.ratio, calib_batches=32), ts.Context(calib_data=calib))
            model = result.model
            removed = ", ".join(f.rsplit(".", 1)[-1] for f in result.record.outcomes[0].touched)
        started = time.perf_counter()
        ppl = llm.perplexity(model, windows)
        seconds = time.perf_counter() - started
        params = sum(p.numel() for p in model.parameters())
        rows.append((stage, len(model.model.layers), params, ppl, windows.numel() / seconds))
        print(rows[-1], flush=True)
    lines = [f"# SmolLM2-135M: `pruning.layers` removing {args.ratio:.0%} of the decoder layers", "",
             f"Removed layers (Block Influence on the 32 calibration windows; layer indices): {removed}. "
             "No recovery training.", "",
             "| model | decoder layers | parameters | perplexity | eval tokens/s |", "|---|---|---|---|---|"]
    lines += [f"| {s} | {n} | {p:,} | {ppl:.2f} | {tps:.0f} |" for s, n, p, ppl, tps in rows]
    lines += ["", f"Speed-up of evaluation: {rows[1][4] / rows[0][4]:.2f}x. Machine: "
              f"{platform.processor() or platform.machine()}, 2 threads, shared (load average {os.getloadavg()[0]:.1f}); "
              f"torch {torch.__version__}. Reproduce: `python bench/pruning_layers_llm.py --ratio {args.ratio}`.", ""]
    DOC.write_text("\n".join(lines))
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
