"""all-MiniLM-L6-v2: 25% and 50% of the attention heads removed by pruning.heads, l1 vs taylor.

Calibration (taylor): 256 Lee background sentences (training text, never evaluation). Measures:
encode latency (batch 8 x 128 tokens, alternating with the original, median of rounds), mean
embedding cosine to the original on the 200 MR sentences, Lee Pearson, WS-353 and SimLex. No
fine-tuning.

With ``--ffn``: a second table instead, 25% of the heads (pruning.heads, taylor, global) and 25%
of the FFN channels (pruning.channel on every ``intermediate.dense``, which also cuts the inputs
of the matching ``output.dense``: 1536 -> 1152 per layer), alone and together, with the encode
latency of the original and of the pruned model in milliseconds (alternating rounds, medians).

Run: flock /tmp/torchslim-bench.lock python bench/pruning_heads_minilm.py [--ffn]   (about 6 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import time
from pathlib import Path

import torch
from _sections import write_section

import torchslim as ts
from torchslim.core import MethodConfig
from torchslim.pruning import ChannelPruningConfig, HeadPruningConfig
from torchslim.zoo import minilm

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "pruning_heads.md"
START, END = "<!-- heads -->", "<!-- /heads -->"
FFN = (r"re:bert\.encoder\.layer\.\d+\.intermediate\.dense",)
HEADS25 = HeadPruningConfig(ratio=0.25, importance="taylor", scope="global", calib_batches=8)
FFN_ROWS: dict[str, tuple[MethodConfig, ...]] = {
    "25% FFN l2": (ChannelPruningConfig(ratio=0.25, importance="l2", targets=FFN),),
    "25% FFN taylor": (ChannelPruningConfig(ratio=0.25, importance="taylor", targets=FFN),),
    "25% heads taylor global + 25% FFN l2": (HEADS25, ChannelPruningConfig(ratio=0.25, importance="l2", targets=FFN)),
    "25% heads taylor global + 25% FFN taylor": (HEADS25, ChannelPruningConfig(ratio=0.25, importance="taylor",
                                                                              targets=FFN)),
}


def calibration(tok: object, n: int = 256, batch: int = 32) -> list[dict[str, torch.Tensor]]:
    return minilm.token_batches(tok, list(minilm.lee_background_sentences()[:n]), batch)


def latencies(original: torch.nn.Module, model: torch.nn.Module, tok: object, rounds: int = 5) -> dict[str, float]:
    """Median encode latency (ms) of both models and median ratio, timed in alternating rounds."""
    pairs = [(minilm.encode_latency(original, tok, repeats=10)["latency_ms"],
              minilm.encode_latency(model, tok, repeats=10)["latency_ms"]) for _ in range(rounds)]
    return {"before_ms": sorted(a for a, _ in pairs)[rounds // 2], "after_ms": sorted(b for _, b in pairs)[rounds // 2],
            "speedup": sorted(a / b for a, b in pairs)[rounds // 2]}


def _write(lines: list[str], start: str, end: str) -> None:
    write_section(DOC, lines, start, end, "# Attention-head pruning")


def ffn_table(tok: object, original: torch.nn.Module, calib: list[dict[str, torch.Tensor]]) -> None:
    """Heads and FFN channels removed together: quality and encode latency before/after."""
    reference = minilm.encode(original, tok, minilm.mr_sentences())
    params = sum(p.numel() for p in original.parameters())
    base = minilm.evaluate_minilm(original, tok)
    lines = ["<!-- heads-ffn -->", "## all-MiniLM-L6-v2: 25% of the heads and 25% of the FFN channels removed, "
             "no fine-tuning", "",
             "Heads: `pruning.heads` ratio 0.25, taylor, global (72 -> 54 heads). FFN: `pruning.channel` ratio 0.25 "
             "on every `intermediate.dense`, which also removes the matching inputs of `output.dense` "
             "(1536 -> 1152 channels per layer). Calibration: 256 Lee background sentences (8 batches of 32). "
             "Latency: one forward pass at batch 8 x 128 tokens, original and pruned timed in alternating "
             "rounds (10 calls each), medians of 5 rounds.", "",
             "| model | params | FFN width | Lee Pearson | MR cosine to original | WS-353 | SimLex "
             "| latency before (ms) | latency after (ms) | speed-up | method s |",
             "|---|---|---|---|---|---|---|---|---|---|---|",
             f"| original | {params:,} | 1536 | {base['lee_pearson']:.3f} | 1.000 | {base['ws353']:.3f} | "
             f"{base['simlex']:.3f} | - | - | 1.00x | - |"]
    for name, cfgs in FFN_ROWS.items():
        model = copy.deepcopy(original)
        started = time.perf_counter()
        for cfg in cfgs:
            model = ts.apply(model, cfg, ts.Context(example_inputs=calib[0], calib_data=calib)).model.eval()
        seconds = time.perf_counter() - started
        q, lat = minilm.evaluate_minilm(model, tok), latencies(original, model, tok)
        width = model.bert.encoder.layer[0].intermediate.dense.out_features
        row = (f"| {name} | {sum(p.numel() for p in model.parameters()):,} | {width} | {q['lee_pearson']:.3f} | "
               f"{minilm.mr_fidelity(model, tok, reference):.3f} | {q['ws353']:.3f} | {q['simlex']:.3f} | "
               f"{lat['before_ms']:.1f} | {lat['after_ms']:.1f} | {lat['speedup']:.2f}x | {seconds:.1f} |")
        print(row, flush=True)
        lines.append(row)
    lines += ["", "Reproduce: `flock /tmp/torchslim-bench.lock python bench/pruning_heads_minilm.py --ffn`. Machine: "
              f"{platform.processor() or platform.machine()}, 2 threads, shared (load average "
              f"{os.getloadavg()[0]:.1f}); torch {torch.__version__}.", "<!-- /heads-ffn -->"]
    _write(lines, "<!-- heads-ffn -->", "<!-- /heads-ffn -->")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--ffn", action="store_true", help="the heads + FFN channels table instead")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.ffn:
        tok = minilm.load_minilm_tokenizer()
        ffn_table(tok, minilm.load_minilm(), calibration(tok))
        return
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
    _write(lines, START, END)


if __name__ == "__main__":
    main()
