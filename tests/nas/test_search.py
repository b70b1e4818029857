"""nas.search: Pareto fronts, strategies, shared SQLite studies, failures, storage errors, save/load."""

from __future__ import annotations

import dataclasses
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import torchslim as ts
from torchslim.errors import ConfigError, DataError, UnsupportedModuleError
from torchslim.export import load, save
from torchslim.nas import CNNSpace, NASSearchConfig, build_cnn, search
from torchslim.nas._study import make_sampler, open_storage, pareto_front

optuna = pytest.importorskip("optuna")

TINY = CNNSpace(base_widths=(4, 8), width_mults=(0.5, 1.0), depths=(0, 1), kernels=(3, 5), image_size=8)


def _cfg(**fields: object) -> NASSearchConfig:
    return NASSearchConfig(**{"space": TINY, "trials": 3, **fields})  # type: ignore[arg-type]


def _base() -> torch.nn.Module:
    return build_cnn(TINY.arch(TINY.extreme(largest=True))).eval()


def test_pareto_front_of_known_points() -> None:
    points = [(0.9, 5.0), (0.8, 2.0), (0.85, 6.0), (0.7, 1.0), (0.8, 2.0), (0.6, 3.0)]
    assert pareto_front(points, [True, False]) == [0, 1, 3, 4]  # equal points do not dominate each other


@pytest.mark.parametrize("strategy", ["random", "tpe"])
def test_search_returns_a_non_dominated_front(strategy: str, nas_ctx: ts.Context) -> None:
    result = search(_cfg(strategy=strategy), nas_ctx)
    assert len(result.rows) == 3 and not result.failed
    assert result.front, "a non-empty set of trials has a non-empty front"
    for p in result.front:
        for q in result.rows:
            better = q["accuracy"] >= p["accuracy"] and q["latency_ms"] <= p["latency_ms"]
            assert not (better and (q["accuracy"], q["latency_ms"]) != (p["accuracy"], p["latency_ms"]))
    for q in result.rows:  # every trial off the front is dominated by a front point
        if q not in result.front:
            assert any(p["accuracy"] >= q["accuracy"] and p["latency_ms"] <= q["latency_ms"] for p in result.front)
    assert result.best["accuracy"] == max(r["accuracy"] for r in result.rows)
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["latency_ms"] > 0 and r["flops"] > 0 for r in result.rows)


def test_apply_swaps_the_body_and_reloads_bit_exact(nas_ctx: ts.Context, tmp_path: Path) -> None:
    model = _base()
    result = ts.apply(model, _cfg(strategy="random", trials=2), nas_ctx)
    stats = result.record.outcomes[-1].stats
    assert stats["trials_complete"] == 2 and stats["pareto_points"] >= 1
    assert result.model.body.arch.to_dict() in [r for r in _arches(nas_ctx.workdir / "nas.db")]
    assert not result.model.training
    assert (nas_ctx.workdir / "plots" / "nas_pareto.png").stat().st_size > 1000
    assert "Pareto front" in (nas_ctx.workdir / "nas_trials.md").read_text()
    x = torch.randn(4, 1, 8, 8)
    save(result, tmp_path / "out")
    reloaded = load(tmp_path / "out", _base)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), result.model(x), rtol=0, atol=0)


def _arches(db: Path) -> list[dict[str, object]]:
    study = optuna.load_study(study_name="torchslim-nas", storage=f"sqlite:///{db}")
    return [t.user_attrs["arch"] for t in study.trials if "arch" in t.user_attrs]


def test_sqlite_study_shared_by_two_sequential_workers_keeps_every_trial(nas_ctx: ts.Context,
                                                                          tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    first = search(_cfg(strategy="random", trials=2, storage=url), nas_ctx)
    second = search(_cfg(strategy="random", trials=4, storage=url), dataclasses.replace(nas_ctx, seed=1))
    assert [r["trial"] for r in second.rows] == [0, 1, 2, 3]
    assert second.rows[:2] == first.rows  # the first worker's trials are kept as they were
    again = search(_cfg(strategy="random", trials=4, storage=url), nas_ctx)  # a full study runs nothing
    assert len(again.rows) == 4


def test_failing_eval_fn_marks_the_trial_failed_and_the_study_goes_on(nas_ctx: ts.Context) -> None:
    calls = []
    good = nas_ctx.eval_fn
    assert good is not None

    def flaky(model: torch.nn.Module) -> dict[str, float]:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("evaluation server is down")
        return good(model)

    result = search(_cfg(strategy="random"), dataclasses.replace(nas_ctx, eval_fn=flaky))
    assert len(result.rows) == 2 and len(result.failed) == 1
    assert result.failed[0]["trial"] == 1 and "evaluation server is down" in result.failed[0]["error"]

    def broken(model: torch.nn.Module) -> dict[str, float]:
        raise ValueError("no labels")

    with pytest.raises(DataError, match="no trial completed .*no labels"):
        search(_cfg(strategy="random", trials=2), dataclasses.replace(nas_ctx, eval_fn=broken, workdir=None))


@pytest.mark.parametrize("url", ["sqlite:////nonexistent-dir/sub/nas.db", "postgresql://nas:secret@127.0.0.1:1/nas",
                                 "nosuchdb://x"])
def test_unreachable_storage_fails_fast_and_clearly(url: str) -> None:
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="nas.search.storage: cannot open the Optuna storage") as info:
        open_storage(url, None)
    assert time.perf_counter() - started < 15
    assert "secret" not in str(info.value)


@pytest.mark.parametrize(("fields", "match"), [
    ({"heartbeat_s": 0}, "heartbeat_s must be >= 1, found 0"),
    ({"heartbeat_s": 5, "grace_period_s": 5}, r"grace_period_s must exceed heartbeat_s \(5\), found 5"),
])
def test_heartbeat_settings_are_checked(fields: dict[str, int], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        NASSearchConfig(**fields)


def test_budget_below_the_smallest_architecture_states_the_reachable_latency(nas_ctx: ts.Context) -> None:
    with pytest.raises(ConfigError, match=r"latency_budget_ms=1e-06 cannot be met: the smallest .* takes "
                                          r"[0-9.]+ ms"):
        search(_cfg(latency_budget_ms=1e-6), nas_ctx)


def test_best_model_is_the_most_accurate_within_the_latency_budget(nas_ctx: ts.Context) -> None:
    free = search(_cfg(strategy="random", trials=4, study_name="free"), nas_ctx)
    budget = sorted(r["latency_ms"] for r in free.rows)[2]  # well above the smallest architecture's
    bounded = search(_cfg(strategy="random", trials=4, study_name="free", latency_budget_ms=budget), nas_ctx)
    within = [r for r in bounded.rows if r["latency_ms"] <= budget]
    assert len(within) >= 3 and bounded.best["latency_ms"] <= budget
    assert bounded.best["accuracy"] == max(r["accuracy"] for r in within)


def test_not_a_searchable_cnn_is_unsupported(nas_ctx: ts.Context) -> None:
    with pytest.raises(UnsupportedModuleError, match="SearchableCNN"):
        ts.apply(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)), _cfg(), nas_ctx)


def test_missing_context_is_a_data_error(nas_ctx: ts.Context) -> None:
    with pytest.raises(DataError, match="ctx.eval_fn"):
        search(_cfg(), dataclasses.replace(nas_ctx, eval_fn=None))


def test_regularized_evolution_mutates_one_gene_of_a_recent_trial() -> None:
    genes = TINY.genes()
    sampler = make_sampler("evolution", genes, seed=0, trials=9)  # population 3
    study = optuna.create_study(directions=["maximize"], sampler=sampler)

    def score(trial: optuna.Trial) -> float:
        params = {g: trial.suggest_categorical(g, list(c)) for g, c in genes.items()}
        return sum(float(v) for v in params.values())

    study.optimize(score, n_trials=12)
    trials = study.trials
    for t in trials[3:]:
        recent = trials[max(0, t.number - 3):t.number]
        assert any(sum(t.params[g] != p.params[g] for g in genes) == 1 for p in recent), t.params


@pytest.mark.parametrize("strategy", ["evolution", "nsga2"])
def test_other_strategies_run_multi_objective(strategy: str) -> None:
    genes = TINY.genes()
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=make_sampler(strategy, genes, seed=0, trials=8))
    study.optimize(lambda t: (sum(float(t.suggest_categorical(g, list(c))) for g, c in genes.items()),
                              float(t.params.get("w0", 1.0))), n_trials=8)
    assert len(study.trials) == 8 and all(t.state.name == "COMPLETE" for t in study.trials)


_WORKER = textwrap.dedent("""
    import sys, torch, torchslim as ts
    from torchslim.nas import CNNSpace, NASSearchConfig, search
    from torchslim.zoo import digits
    from torchslim.zoo.data import head, make_eval_fn
    space = CNNSpace(base_widths=(4, 8), width_mults=(0.5, 1.0), depths=(0, 1), kernels=(3, 5), image_size=8)
    test = head(digits("test"), 200)
    ctx = ts.Context(train_data=head(digits("train"), 256), eval_fn=make_eval_fn(test),
                     example_inputs=test.tensors[0][:1])
    search(NASSearchConfig(space=space, trials=int(sys.argv[2]), strategy="random", storage=sys.argv[1]), ctx)
""")


@pytest.mark.integration
def test_killed_worker_loses_no_completed_trial(tmp_path: Path) -> None:
    db = tmp_path / "study.db"
    url = f"sqlite:///{db}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(ts.__file__).parents[1]), *sys.path])}
    worker = subprocess.Popen([sys.executable, "-c", _WORKER, url, "50"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while _complete(db) < 2 and time.monotonic() < deadline and worker.poll() is None:
            time.sleep(0.2)
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
    finally:
        if worker.poll() is None:
            worker.kill()
    done = _complete(db)
    assert done >= 2
    finisher = subprocess.run([sys.executable, "-c", _WORKER, url, str(done + 2)], env=env, timeout=300,
                              capture_output=True, text=True)
    assert finisher.returncode == 0, finisher.stderr[-2000:]
    assert _complete(db) >= done + 1  # the killed worker's running trial stays RUNNING, not COMPLETE


def _complete(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db) as conn:
            return int(conn.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0])
    except sqlite3.OperationalError:  # tables not created yet
        return 0
