"""SmolLM2-135M weight-only quantization: RTN vs GPTQ, perplexity on the Lee windows (ASSETS.md 3.1).

Every decoder-layer Linear is quantized (asymmetric, group 64); the tied embedding / lm_head
stays fp32, except in ``-emb8`` runs (int8, group 64, one table serving both). Calibration: the 32 shared windows after the evaluation text. Reported per run:
perplexity, packed checkpoint size against fp32 (``serialized_size`` of the model as saved),
one-shot time, peak resident memory during the one-shot step, and evaluation tokens/s.

Run: python bench/quant_llm.py [--runs fp32,rtn-w4,gptq-w4,...] [--threads 2]
Results merge into docs/benchmarks/quantization-llm.md, so runs can be split across calls.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import torchslim as ts
from torchslim.core.config import MethodConfig
from torchslim.core.storage import serialized_size
from torchslim.export import load, save
from torchslim.quantization import AWQConfig, GPTQConfig, WeightOnlyConfig
from torchslim.quantization.mixed import MixedPrecisionConfig
from torchslim.zoo import llm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pruning_llm import PeakRSS  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "quantization-llm.md"
STATE = DOC.with_suffix(".json")
DECODER = (r"re:model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj",)
RUNS: dict[str, MethodConfig | None] = {
    "fp32": None,
    "rtn-w8": WeightOnlyConfig(bits=8, group_size=64, targets=DECODER),
    "rtn-w4": WeightOnlyConfig(bits=4, group_size=64, targets=DECODER),
    "rtn-w3": WeightOnlyConfig(bits=3, group_size=64, targets=DECODER),
    "gptq-w4": GPTQConfig(bits=4, group_size=64, targets=DECODER),
    "gptq-w4-g32": GPTQConfig(bits=4, group_size=32, targets=DECODER),
    "gptq-w4-noorder": GPTQConfig(bits=4, group_size=64, act_order=False, targets=DECODER),
    "gptq-w3": GPTQConfig(bits=3, group_size=64, targets=DECODER),
    "gptq-w4-clip": GPTQConfig(bits=4, group_size=64, clip_shrink=0.2, targets=DECODER),
    "gptq-w3-clip": GPTQConfig(bits=3, group_size=64, clip_shrink=0.3, targets=DECODER),
    "gptq-w4-awq": GPTQConfig(bits=4, group_size=64, scale_grid=20, targets=DECODER),
    "gptq-w4-awq-clip": GPTQConfig(bits=4, group_size=64, scale_grid=20, clip_shrink=0.2, targets=DECODER),
    "gptq-w4-emb8": GPTQConfig(bits=4, group_size=64, embedding_bits=8, targets=DECODER),
    "awq-w4": AWQConfig(bits=4, group_size=64, targets=DECODER),
    "awq-w4-clip": AWQConfig(bits=4, group_size=64, clip_shrink=0.2, targets=DECODER),
    "mixed-4.5": MixedPrecisionConfig(bits=(3, 4, 8), average_bits=4.5, group_size=64, targets=DECODER),
    "mixed-4.0": MixedPrecisionConfig(bits=(3, 4, 8), average_bits=4.0, group_size=64, targets=DECODER),
    "gptq-w4-g192": GPTQConfig(bits=4, group_size=192, targets=DECODER),
    "mixed-4.5-g192": MixedPrecisionConfig(bits=(4, 8), average_bits=4.5, group_size=192, targets=DECODER),
}
# ASSETS.md, same windows and machine type, not measured in this run.
REFERENCE = {"fp32": 30.77, "rtn-w8": 30.79, "rtn-w4": 39.26, "rtn-w3": 97.0, "gptq-w4": 35.11,
             "gptq-w4-noorder": 38.66, "gptq-w3": 85.55}
LLMCOMPRESSOR = {"gptq-w4": 35.24, "gptq-w3": 55.93}
TARGET = {"gptq-w4-emb8": "checkpoint <= 0.30", "gptq-w4": 35.0, "gptq-w3": 55.0, "gptq-w4-clip": "best int4 <= 34.0", "gptq-w3-clip": 55.0,
          "awq-w4-clip": "best int4 <= 34.0",
          "gptq-w4-awq": "best int4 <= 34.0", "gptq-w4-awq-clip": "best int4 <= 34.0", "awq-w4": "< RTN 39.26",
          "mixed-4.5": "< GPTQ w4 at >= its size (g64, g32)", "mixed-4.5-g192": "< GPTQ w4 (g64) at >= its size"}


def run_one(name: str, cfg: MethodConfig | None, eval_windows: torch.Tensor, calib: list[torch.Tensor],
            dense_bytes: int) -> dict[str, Any]:
    model = llm.load_smollm2()
    row: dict[str, Any] = {"method": cfg.name if cfg else "-", "threads": torch.get_num_threads(),
                           "date": time.strftime("%Y-%m-%d %H:%M")}
    with PeakRSS() as peak:
        started = time.perf_counter()
        result = ts.apply(model, cfg, ts.Context(calib_data=calib)) if cfg is not None else None
        row["oneshot_s"] = time.perf_counter() - started
    row["peak_rss_mb"] = peak.peak_mb
    if result is not None:  # judged on the model reloaded from its checkpoint
        with tempfile.TemporaryDirectory() as folder:
            save(result, folder, overwrite=True)
            row["size_ratio"] = (Path(folder) / "model.safetensors").stat().st_size / dense_bytes
            model = load(folder, llm.load_smollm2)
    else:
        row["size_ratio"] = 1.0
    started = time.perf_counter()
    row["ppl"] = llm.perplexity(model, eval_windows)
    row["eval_s"] = time.perf_counter() - started
    row["tokens_s"] = eval_windows.numel() / row["eval_s"]
    return row


def render(state: dict[str, dict[str, Any]]) -> str:
    lines = ["# Weight-only quantization of SmolLM2-135M (Lee background windows)", "",
             "Every decoder-layer Linear, asymmetric, group 64; tied embedding / lm_head kept fp32 except in `-emb8` "
             "runs (int8 round to nearest, group 64, one set of codes for both); `-clip` runs search each "
             "group's clipping range (`clip_shrink`); `-awq` runs scale columns as AWQ before GPTQ (`scale_grid`). "
             "Perplexity on "
             "the first 24 windows of 512 tokens; calibration on the next 32 (ASSETS.md 3.1).", "",
             "| run | method | ppl | plain reference (ASSETS) | llm-compressor 0.14 (ASSETS) | target | checkpoint / fp32 | "
             "one-shot s | peak RSS MB | eval tokens/s | measured |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in RUNS:
        if name not in state:
            continue
        r = state[name]
        lines.append(f"| {name} | `{r['method']}` | {r['ppl']:.2f} | {REFERENCE.get(name, '—')} | "
                     f"{LLMCOMPRESSOR.get(name, '—')} | {TARGET.get(name, '—')} | {r['size_ratio']:.3f} | "
                     f"{r['oneshot_s']:.0f} | {r['peak_rss_mb']:.0f} | {r['tokens_s']:.0f} | {r['date']} |")
    lines += ["", "Notes:",
              "- The reference and llm-compressor columns were measured for ASSETS.md on the same windows and "
              "machine type, not in this run (llm-compressor needs its own venv; ASSETS.md says how).",
              "- Checkpoint size: `model.safetensors` as torchslim saves it (packed codes, fp32 scales and zero "
              "points, fp32 embedding which is 21% of the parameters, int8 in `-emb8` runs) over the fp32 state; "
              "rows measured from 2026-11-27 on are judged on the model reloaded from that file (earlier rows: "
              "the model in memory, which reloads bit-exact).",
              "- `gptq-w4-g32` uses groups of 32 (its scales and zero points cost twice g64's), the uniform int4 "
              "run at least as large as `mixed-4.5`. Mixed checkpoints are measured, not derived from "
              "`average_bits`: 2- to 4-bit codes are stored a nibble each and 5- to 8-bit codes a byte each.",
              "- `mixed-4.5-g192` spends 4.5 bits per weight on codes with no packing waste (4-bit codes in "
              "nibbles, 8-bit in bytes) and groups of 192 (the largest dividing both 576 and 1536), whose "
              "scales and zero points cost a third of a bit per weight: 4.83 bits per weight in all against "
              "5.0 for uniform int4 with groups of 64 (`gptq-w4`). `gptq-w4-g192` is uniform int4 at that "
              "group size, to show what the 8-bit layers buy.",
              "- tokens/s: perplexity evaluation throughput (batch of 512-token windows); the int4 layers "
              "dequantise on the fly and multiply in fp32, so they are not faster on CPU.",
              f"- Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores shared with other "
              f"jobs (load average {os.getloadavg()[0]:.1f} at the last write); torch {torch.__version__}.",
              "- Reproduce: `python bench/quant_llm.py --runs " + ",".join(n for n in RUNS if n in state) + "`.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tok = llm.load_smollm2_tokenizer()
    eval_windows = llm.lee_windows(tok, "eval")
    calib = list(llm.lee_windows(tok, "calib").split(1))
    dense_bytes = serialized_size(llm.load_smollm2())
    state = json.loads(STATE.read_text()) if STATE.is_file() else {}
    for name in args.runs.split(","):
        state[name] = run_one(name, RUNS[name], eval_windows, calib, dense_bytes)
        print(name, state[name], flush=True)
        STATE.write_text(json.dumps(state, indent=1))
        DOC.write_text(render(state))
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
