"""Data-parallel training: sharded batches, 2 processes (gloo, loopback) match 1, resume across sizes."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from torchslim.core.storage import read_state_dict
from torchslim.errors import ConfigError
from torchslim.train.distributed import ShardedBatches

TESTS = Path(__file__).resolve().parents[1]


def test_shards_of_each_global_batch_are_the_single_process_batch() -> None:
    single = torch.utils.data.DataLoader(range(103), batch_size=16, shuffle=True,
                                         generator=torch.Generator().manual_seed(7))
    shards = []
    for rank in range(3):  # as the driver builds it: the loader draws its base seed from the same generator
        generator = torch.Generator().manual_seed(7)
        sampler = ShardedBatches(103, 16, generator, rank, 3)
        shards.append([b.tolist() for b in torch.utils.data.DataLoader(range(103), batch_sampler=sampler,
                                                                       generator=generator)])
    assert len(shards[0]) == len(single)
    for k, batch in enumerate(single):
        assert sum((s[k] for s in shards), []) == batch.tolist()
        assert max(len(s[k]) for s in shards) - min(len(s[k]) for s in shards) <= 1


def test_a_tail_smaller_than_the_world_is_dropped_and_too_many_processes_are_refused() -> None:
    sampler = ShardedBatches(33, 16, torch.Generator().manual_seed(0), 1, 2)
    assert len(sampler) == 2 and len(list(sampler)) == 2  # the single leftover sample cannot be split
    with pytest.raises(ConfigError, match="at least one sample per process"):
        ShardedBatches(100, 4, torch.Generator(), 0, 8)


def _torchrun(nproc: int, *args: str) -> list[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            "--master-addr=127.0.0.1", f"--master-port={port}", *args]


@pytest.mark.integration
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    sys.path.insert(0, str(TESTS / "train"))
    try:
        from ddp_worker import STEPS, train
    finally:
        sys.path.pop(0)
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(_torchrun(2, str(TESTS / "train" / "ddp_worker.py"), str(out)), env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(out, weights_only=True)
    assert ddp["world"] == 2 and ddp["ranks_agree"]
    losses, state = train()
    assert len(losses) == len(ddp["losses"]) == STEPS
    assert max(abs(a - b) for a, b in zip(losses, ddp["losses"], strict=True)) < 1e-4
    assert losses[-1] < losses[0]
    for key, value in state.items():
        torch.testing.assert_close(ddp["state"][key], value, atol=1e-4, rtol=1e-4, msg=key)


def _descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        children = (task / "children").read_text().split() if (task / "children").exists() else []
        for child in map(int, children):
            found += [child, *_descendants(child)]
    return found


def _kill_tree(pid: int) -> None:
    for victim in [*_descendants(pid), pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)


RECIPE = """
version: 1
model: py:cli_models:slow_mlp
data: zoo:digits
stages:
  - name: tune
    methods: [{method: distillation.logits, alpha: 0.5}]
    train: {epochs: 6, batch_size: 32}
measure: [params]
export: [checkpoint]
"""


@pytest.mark.integration
def test_a_two_process_run_killed_mid_training_resumes_on_one_process(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(TESTS), "TORCHSLIM_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "torchslim.cli", "--quiet", "compress", str(recipe),
                             "--out", str(out), "--nproc", "2"], env=env, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    marker = out / "checkpoints" / "tune" / "train-2.pt"
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    _kill_tree(proc.pid)  # torchrun and both workers (which it starts in sessions of their own)
    proc.wait()
    assert marker.exists() and not (out / "model.safetensors").exists(), "the run was not killed mid-training"
    resumed = subprocess.run([sys.executable, "-m", "torchslim.cli", "--quiet", "compress", str(recipe),
                              "--out", str(out), "--resume"], env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (out / "model.safetensors").is_file() and not (out / "checkpoints").exists()
    full = subprocess.run([sys.executable, "-m", "torchslim.cli", "--quiet", "compress", str(recipe),
                           "--out", str(tmp_path / "full")], env=env, capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]
    a, _ = read_state_dict(tmp_path / "full" / "model.safetensors")
    b, _ = read_state_dict(out / "model.safetensors")
    for key in a:  # the same batches and updates, up to float rounding of the gradient all-reduce
        torch.testing.assert_close(b[key], a[key], atol=1e-4, rtol=1e-4, msg=key)


def test_nproc_below_one_is_bad_input(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    proc = subprocess.run([sys.executable, "-m", "torchslim.cli", "compress", "builtin:demo", "--out",
                           str(tmp_path / "x"), "--nproc", "0"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "--nproc" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()
