"""A throwaway PostgreSQL server for trying parallel ``nas.search`` workers on one machine.

Tests and benches use it to give several search workers one Optuna study on a real server:
``throwaway_server()`` runs ``initdb`` and ``pg_ctl start`` in a temporary folder, listens on
127.0.0.1 at a free port with trust authentication (user ``torchslim``, no password), and on
exit stops the server and deletes the folder, also after an error. It is not for production
storage: nothing survives the ``with`` block and fsync is off by default.

Run as root, the folder is given to the ``postgres`` user and the server runs as it (through
``runuser``), as PostgreSQL refuses to run as root. The server binaries come from PATH or, where
Debian keeps them, the newest ``/usr/lib/postgresql/<version>/bin``; ``psycopg2`` is imported
only when a database is made. ``make setup`` installs both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from torchslim.errors import TorchslimError

__all__ = ["Server", "throwaway_server"]

SETUP = "`make setup` installs the Debian package postgresql and the driver psycopg2-binary"


@dataclasses.dataclass(frozen=True)
class Server:
    """A running throwaway server.

    Args:
        port: Its TCP port on 127.0.0.1.
        version: What ``postgres --version`` printed, e.g. ``postgres (PostgreSQL) 15.8``.
        folder: The temporary folder holding its data and ``server.log``; deleted on exit.
    """

    port: int
    version: str
    folder: Path

    def create_database(self, name: str) -> str:
        """Create the empty database ``name`` and return its Optuna storage URL."""
        psycopg2 = _driver()
        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="torchslim", dbname="postgres")
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return f"postgresql+psycopg2://torchslim@127.0.0.1:{self.port}/{name}"


@contextlib.contextmanager
def throwaway_server(*, stop: Literal["fast", "immediate"] = "fast", fsync: bool = False) -> Iterator[Server]:
    """Start a PostgreSQL server of its own; stop it and delete its folder on exit.

    Args:
        stop: ``pg_ctl`` shutdown mode: ``fast`` ends sessions and writes a checkpoint,
            ``immediate`` kills the server at once (quicker, for tests).
        fsync: Flush writes to disk as a real server does (for timings comparable to one);
            off by default, since the data is thrown away.

    Raises:
        TorchslimError: the server binaries, the ``postgres`` user (when run as root) or the
            driver are missing, or ``initdb`` / ``pg_ctl start`` failed (with the end of its output).
    """
    bindir = _server_bin()
    _driver()  # fail before starting anything
    as_server = _as_server_user()
    root = Path(tempfile.mkdtemp(prefix="torchslim-pg-"))
    data, port = root / "data", _free_port()
    pg_ctl = [*as_server, str(bindir / "pg_ctl"), "-D", str(data)]
    try:
        if as_server:
            user = pwd.getpwnam("postgres")
            os.chown(root, user.pw_uid, user.pw_gid)
        _run([*as_server, str(bindir / "initdb"), "-D", str(data), "-U", "torchslim", "--auth=trust",
              "-E", "UTF8", "--no-sync"])
        options = f"-h 127.0.0.1 -p {port} -k {data}" + ("" if fsync else " -F")
        _run([*pg_ctl, "-l", str(root / "server.log"), "-w", "-t", "60", "-o", options, "start"],
             log=root / "server.log")
        version = _run([str(bindir / "postgres"), "--version"]).strip()
        yield Server(port=port, version=version, folder=root)
    finally:
        if (data / "postmaster.pid").exists():  # also after a start that timed out
            with contextlib.suppress(subprocess.TimeoutExpired):
                subprocess.run([*pg_ctl, "-m", stop, "-w", "stop"], check=False, capture_output=True,
                               timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def _server_bin() -> Path:
    on_path = shutil.which("initdb")  # Debian keeps the server binaries off PATH, one folder per version
    found = [Path(on_path)] if on_path else []
    found += sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True,
                    key=lambda p: [int(x) for x in p.parts[-3].split(".") if x.isdigit()])
    for initdb in found:
        if all((initdb.parent / tool).is_file() for tool in ("pg_ctl", "postgres")):
            return initdb.parent
    raise TorchslimError(f"no PostgreSQL server binaries (initdb, pg_ctl, postgres) on PATH or in "
                         f"/usr/lib/postgresql/*/bin: {SETUP}")


def _driver() -> Any:
    try:
        import psycopg2
    except ImportError as exc:
        raise TorchslimError(f"no PostgreSQL driver (psycopg2 does not import: {exc}): {SETUP}") from exc
    return psycopg2


def _as_server_user() -> list[str]:
    """The command prefix that runs a server tool as ``postgres`` when we are root, else nothing."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise TorchslimError(f"running as root, but there is no `postgres` user to run the server as: "
                             f"{SETUP}") from None
    return ["runuser", "-u", "postgres", "--"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(cmd: list[str], log: Path | None = None) -> str:
    """Stdout of ``cmd``; a failure or a two-minute hang raises with the end of its output and ``log``."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as exc:
        raise TorchslimError(f"{' '.join(cmd)} did not finish within 120 s") from exc
    if done.returncode != 0:
        tail = ""  # a server log goes with the folder: show its end now
        if log is not None and log.is_file():
            tail = f"\n{log.name}: {log.read_text(errors='replace')[-2000:]}"
        raise TorchslimError(f"{' '.join(cmd)} failed with exit code {done.returncode}: "
                             f"{done.stdout[-2000:]}{done.stderr[-2000:]}{tail}")
    return done.stdout
