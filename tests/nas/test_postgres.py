"""Parallel search on a real PostgreSQL server: a worker killed mid-trial loses no completed trial.

The server (``torchslim.nas.postgres.throwaway_server``) runs on 127.0.0.1 (a free port) from a
temporary data folder and is always stopped. It is installed by ``make setup`` (Debian package
``postgresql``, driver ``psycopg2-binary``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

import torchslim
from torchslim.errors import TorchslimError
from torchslim.nas.postgres import SETUP, Server, throwaway_server

pytestmark = pytest.mark.integration
T = TypeVar("T")

RECIPE = """
version: 1
model: py:torchslim.nas.spaces:digits_cnn
data: zoo:digits
stages:
  - name: search
    methods:
      - method: nas.search
        strategy: random
        trials: 8
        epochs_per_trial: 20
        heartbeat_s: 1
        grace_period_s: 2
        space: {base_widths: [4, 8], width_mults: [0.5, 1.0], depths: [0, 1], kernels: [3, 5], image_size: 8}
measure: [params]
export: [checkpoint]
"""


def _start(stack: contextlib.ExitStack, **options: Any) -> Server:
    """A throwaway server entered on ``stack``; skips the test when the server or driver is missing."""
    try:
        return stack.enter_context(throwaway_server(**options))
    except TorchslimError as exc:
        if SETUP in str(exc):  # binaries, `postgres` user or driver missing: not a failure
            pytest.skip(str(exc))
        raise


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A fresh database on a PostgreSQL server of its own; the server is stopped afterwards."""
    with contextlib.ExitStack() as stack:
        yield _start(stack, stop="immediate").create_database("nas")


def test_throwaway_server_is_gone_after_the_block() -> None:
    with contextlib.ExitStack() as stack:
        server = _start(stack)
        socket.create_connection(("127.0.0.1", server.port), timeout=10).close()  # it listens
        assert server.folder.is_dir() and "PostgreSQL" in server.version
    assert not server.folder.exists()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=10)


def _worker(recipe: Path, url: str, number: int, log: Path) -> subprocess.Popen[bytes]:
    src = str(Path(torchslim.__file__).resolve().parents[1])  # this checkout, not an installed copy
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "torchslim.cli", "--quiet", "search", str(recipe),
                                 "--storage", url, "--worker", str(number)], env=env, stdout=out,
                                stderr=subprocess.STDOUT)


def _wait_for(predicate: Callable[[], T | None], timeout: float, what: str,
              procs: list[subprocess.Popen[bytes]]) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.1)
    raise AssertionError(f"no {what} within {timeout} s; worker exit codes {[p.poll() for p in procs]}")


def test_killed_worker_loses_no_completed_trial(postgres_url: str, tmp_path: Path) -> None:
    import optuna
    from optuna.trial import TrialState

    from torchslim.nas import _study

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    storage = _study.open_storage(postgres_url, None)
    host = socket.gethostname()

    def trials() -> list[optuna.trial.FrozenTrial]:
        try:
            return optuna.load_study(study_name="torchslim-nas", storage=storage).get_trials()
        except KeyError:  # the first worker has not created the study yet
            return []

    survivor = _worker(recipe, postgres_url, 1, tmp_path / "survivor.log")  # both create the tables
    victim = _worker(recipe, postgres_url, 2, tmp_path / "victim.log")  # and the study at once
    try:

        def victim_running() -> optuna.trial.FrozenTrial | None:  # "worker" is set as training starts
            mine = [t for t in trials() if t.user_attrs.get("worker") == f"{host}:{victim.pid}"]
            if not any(t.state == TrialState.COMPLETE for t in mine):
                return None
            return next((t for t in mine if t.state == TrialState.RUNNING), None)

        killed = _wait_for(victim_running, 60, "running second trial of the second worker", [survivor, victim])
        before = {t.number: t.values for t in trials() if t.state == TrialState.COMPLETE}
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(10) == -signal.SIGKILL
        assert survivor.wait(90) == 0, (tmp_path / "survivor.log").read_text()[-3000:]
    finally:
        for proc in (survivor, victim):
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    after = {t.number: t for t in trials()}
    assert any(after[n].user_attrs["worker"] == f"{host}:{victim.pid}" for n in before)  # one of its own
    for number, values in before.items():  # every trial complete before the kill is kept as it was
        assert after[number].state == TrialState.COMPLETE and after[number].values == values
    complete = [t for t in after.values() if t.state == TrialState.COMPLETE]
    assert len(complete) >= 8  # the budget counts complete trials: the lost one does not use it up
    lost = after[killed.number]
    assert lost.state == TrialState.FAIL and "error" not in lost.user_attrs  # no heartbeat: failed
    retried = [t for t in complete if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retried) == 1 and retried[0].params == killed.params  # its architecture ran again
    assert not [t for t in after.values() if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert all(t.user_attrs["worker"] == f"{host}:{survivor.pid}" for t in complete if t.number > killed.number)
