"""The main job, measured: `torchslim demo` on fashion_cnn, written to docs/benchmarks/demo.md.

Checks the foundation's promises: accuracy drop <= 1.0 point, serialized size >= 4x smaller,
int8 ONNX Runtime latency next to fp32 (torch and ONNX Runtime, same run), wall time < 10 min.
    python bench/demo.py [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from torchslim.job import run_job
from torchslim.report.markdown import render_markdown

OUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "demo.md"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        record = run_job("builtin:demo", Path(tmp) / "demo", quick=args.quick, progress=False)
        seconds = time.perf_counter() - started
    before, after = record.before(), record.after()
    drop = 100 * (before["accuracy"] - after["accuracy"])
    shrink = before["size_bytes"] / after["size_bytes"]
    rows = {(d.name, d.engine): d.values for d in record.deployments}
    summary = [
        "# Demo benchmark: prune 50% -> distill -> int8 on fashion_cnn", "",
        f"Command: `python bench/demo.py{' --quick' if args.quick else ''}` "
        f"(the same job as `make demo`); wall time {seconds:.0f} s, the pretrained model "
        "loaded from the cache.", "",
        "| check | target | measured |", "|---|---|---|",
        f"| test accuracy drop | <= 1.0 point | {drop:.2f} points "
        f"({100 * before['accuracy']:.2f}% -> {100 * after['accuracy']:.2f}%) |",
        f"| serialized size | >= 4x smaller | {shrink:.2f}x ({before['size_bytes']:,.0f} -> "
        f"{after['size_bytes']:,.0f} bytes) |",
    ]
    fp32, int8 = rows.get(("original fp32", "onnxruntime")), rows.get(("compressed", "onnxruntime"))
    torch32 = rows.get(("original fp32", "torch"))
    if fp32 and int8 and torch32:
        summary.append(
            f"| int8 latency (ONNX Runtime, batch 1) | measured | {int8['latency_ms']:.3f} ms vs fp32 "
            f"ONNX Runtime {fp32['latency_ms']:.3f} ms ({fp32['latency_ms'] / int8['latency_ms']:.2f}x) and "
            f"torch eager {torch32['latency_ms']:.3f} ms ({torch32['latency_ms'] / int8['latency_ms']:.2f}x) |")
    text = "\n".join(summary) + "\n\n## Full report\n\n" + render_markdown(record).split("\n", 1)[1]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
