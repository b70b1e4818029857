"""Parallel search on a real PostgreSQL server: a worker killed mid-trial loses no completed trial.

The server runs on 127.0.0.1 (a free port) from a temporary data folder and is always stopped.
It is installed by ``make setup`` (Debian package ``postgresql``, driver ``psycopg2-binary``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

import torchslim

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


def _server_bin() -> Path | None:
    on_path = shutil.which("initdb")  # Debian keeps the server binaries off PATH, one folder per version
    found = [Path(on_path)] if on_path else []
    found += sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: [int(x) for x in p.parts[-3].split(".") if x.isdigit()], reverse=True)
    return found[0].parent if found else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A fresh database on a PostgreSQL server of its own; the server is stopped afterwards."""
    bindir = _server_bin()
    if bindir is None or not (bindir / "pg_ctl").is_file():
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl): `make setup` installs the Debian "
                    "package postgresql")
    psycopg2 = pytest.importorskip("psycopg2", reason="no PostgreSQL driver: `make setup` installs "
                                   "psycopg2-binary (the dev extra)")
    root = Path(tempfile.mkdtemp(prefix="torchslim-pg-"))
    as_server: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        as_server = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", _free_port()

    def run(*cmd: str) -> None:
        done = subprocess.run([*as_server, *cmd], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{' '.join(cmd)} failed: {done.stdout[-2000:]}{done.stderr[-2000:]}"

    started = False
    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "torchslim", "--auth=trust", "-E", "UTF8",
            "--no-sync")
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60",
            "-o", f"-h 127.0.0.1 -p {port} -k {data} -F", "start")
        started = True
        conn = psycopg2.connect(host="127.0.0.1", port=port, user="torchslim", dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE nas")
        conn.close()
        yield f"postgresql+psycopg2://torchslim@127.0.0.1:{port}/nas"
    finally:
        if started:
            subprocess.run([*as_server, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w",
                            "stop"], check=False, capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


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
