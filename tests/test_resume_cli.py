"""Kill `torchslim compress` during training, resume it, and get the uninterrupted weights."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli.test_cli import TESTS, run_cli
from torchslim.core.storage import read_state_dict

RECIPE = """
version: 1
model: py:cli_models:slow_mlp
data: zoo:digits
stages:
  - name: prune
    methods: [{method: pruning.magnitude, sparsity: 0.5}]
  - name: tune
    methods: [{method: distillation.logits, alpha: 0.5}]
    train: {epochs: 6, batch_size: 32}
measure: [params]
export: [checkpoint]
"""


@pytest.mark.integration
def test_killed_run_resumes_to_identical_weights(tmp_path: Path) -> None:
    import os

    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    full = run_cli("compress", str(recipe), "--out", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    proc = subprocess.Popen([sys.executable, "-m", "torchslim.cli", "--quiet", "compress", str(recipe),
                             "--out", str(out)], env=env, stderr=subprocess.PIPE, text=True)
    marker = out / "checkpoints" / "tune" / "train-2.pt"
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists() and not (out / "model.safetensors").exists(), "the run was not killed mid-training"

    resumed = run_cli("compress", str(recipe), "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, _ = read_state_dict(tmp_path / "full" / "model.safetensors")
    b, _ = read_state_dict(out / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
