"""One-command jobs on hf: folders (tiny random models): report with samples, assets, exports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_hf import bert_folder, llama_folder

TESTS = Path(__file__).resolve().parents[1]
SRC = TESTS.parent / "src"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``torchslim --quiet ARGS`` on this checkout's sources."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)])}
    return subprocess.run([sys.executable, "-m", "torchslim.cli", "--quiet", *args], capture_output=True,
                          text=True, env=env, timeout=600)

pytest.importorskip("transformers")


def test_smollm2_recipe_on_a_tiny_llama_then_export(tmp_path: Path) -> None:
    folder = llama_folder(tmp_path / "llama")
    out = tmp_path / "run"
    proc = run_cli("compress", "builtin:smollm2-int4", "--model", f"hf:{folder}", "--out", str(out), "--quick")
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((out / "record.json").read_text())
    before, after = record["metrics"][0]["values"], record["metrics"][-1]["values"]
    assert before["perplexity"] > 1 and after["perplexity"] > 1 and before["perplexity"] != after["perplexity"]
    assert after["size_bytes"] < before["size_bytes"]
    [sample] = record["samples"]
    assert sample["prompt"].startswith("The Prime Minister")
    assert isinstance(sample["before"], str) and isinstance(sample["after"], str)  # random model: any text
    report = (out / "report.md").read_text()
    assert "## Samples" in report and f"- after: {sample['after']!r}" in report
    assert "<h2>Samples</h2>" in (out / "report.html").read_text()
    for name in ("config.json", "tokenizer.json", "model.safetensors", "structure.json"):
        assert (out / name).is_file(), name

    for fmt, file in (("torchscript", "model.torchscript.pt"), ("torch_export", "model.pt2")):
        proc = run_cli("export", str(out), "--format", fmt)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "verified" in proc.stdout and "cosine" in proc.stdout and (out / file).is_file()
    rows = {row["name"]: row for row in json.loads((out / "record.json").read_text())["deployments"]}
    assert rows["exported torchscript"]["values"]["cosine"] > 0.99
    assert rows["exported torch_export"]["values"]["max_abs_diff"] < 1e-2
    assert "exported torch_export" in (out / "report.md").read_text()


def test_minilm_recipe_on_a_tiny_sentence_encoder(tmp_path: Path) -> None:
    folder = bert_folder(tmp_path / "bert")
    out = tmp_path / "run"
    proc = run_cli("compress", "builtin:minilm-int8", "--model", f"hf:{folder}", "--out", str(out), "--quick")
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((out / "record.json").read_text())
    assert {"lee_pearson", "ws353", "simlex"} <= record["metrics"][-1]["values"].keys()
    assert record["samples"] == [] and (out / "modules.json").is_file()


def test_bad_hf_folder_and_failing_export_exit_2(tmp_path: Path) -> None:
    proc = run_cli("compress", "builtin:smollm2-int4", "--model", f"hf:{tmp_path / 'nope'}",
                   "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()
    proc = run_cli("export", str(tmp_path), "--format", "torchscript")
    assert proc.returncode == 2 and "record.json does not exist" in proc.stderr
