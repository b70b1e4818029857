"""The command line: exit codes, one-paragraph errors without tracebacks, nothing half-written."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]

GOOD = """
version: 1
model: py:cli_models:small_mlp
data: zoo:digits
stages:
  - name: prune
    methods:
      - {method: pruning.magnitude, sparsity: 0.5}
      - {method: distillation.logits}
    train: {epochs: 1, batch_size: 64}
measure: [accuracy, params, size]
export: [checkpoint]
"""


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(TESTS), "TORCHSLIM_CACHE": str(TESTS / ".." / ".cache-test")}
    return subprocess.run([sys.executable, "-m", "torchslim.cli", "--quiet", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=600)


BAD = [
    ("pruning.magnitude, sparsity: 0.5}", "pruning.magnitude, sparsty: 0.5}", "did you mean 'sparsity'"),
    ("pruning.magnitude,", "pruning.magnitde,", "unknown method 'pruning.magnitde'"),
    ("sparsity: 0.5}", "sparsity: high}", "expected float, found str 'high'"),
    ("sparsity: 0.5}", "sparsity: 1.5}", "sparsity must be in [0, 1)"),
    ("epochs: 1,", "epochs: [1,", "YAML syntax error at line"),
    ("py:cli_models:small_mlp", "py:cli_models:nothing_here", "py:cli_models:nothing_here"),
    ("py:cli_models:small_mlp", "hub:bert", "hub:bert"),
]


@pytest.mark.integration
@pytest.mark.parametrize(("old", "new", "message"), BAD)
def test_bad_input_exits_2_with_a_message_and_writes_nothing(tmp_path: Path, old: str, new: str,
                                                             message: str) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(GOOD.replace(old, new, 1))
    out = tmp_path / "out"
    proc = run_cli("compress", str(recipe), "--out", str(out))
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("torchslim: error:") and proc.stderr.count("\n") == 1
    assert not out.exists()


@pytest.mark.integration
def test_missing_recipe_file_and_foreign_output_folder(tmp_path: Path) -> None:
    proc = run_cli("compress", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(GOOD)
    proc = run_cli("compress", str(recipe), "--out", str(foreign))
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert (foreign / "notes.txt").read_text() == "keep me"


@pytest.mark.integration
def test_compress_writes_the_output_folder(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(GOOD)
    out = tmp_path / "out"
    proc = run_cli("compress", str(recipe), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    for name in ("model.safetensors", "structure.json", "recipe.yaml", "record.json", "report.html", "report.md"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoints").exists()
    again = run_cli("report", str(out))
    assert again.returncode == 0, again.stderr
    exported = run_cli("export", str(out), "--format", "onnx")
    assert exported.returncode == 0, exported.stderr
    assert (out / "model.onnx").is_file() and '"top1_agreement": "1.0"' in exported.stdout


def test_methods_and_explain_cover_every_key() -> None:
    from torchslim.cli.__main__ import main
    from torchslim.core import list_methods

    assert main(["methods"]) == 0
    for key in list_methods():
        assert main(["explain", key]) == 0
    assert main(["explain", "pruning.nope"]) == 2
