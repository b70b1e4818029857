"""Optuna plumbing for nas.search: storage, samplers (with regularized evolution), Pareto front, plot.

Optuna is imported inside functions only: ``import torchslim`` must not pull it in.
"""

from __future__ import annotations

import io
import logging
import random
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from torchslim.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["dominates", "make_sampler", "open_storage", "pareto_front", "plot_front", "spent", "table",
           "twin", "write_report"]

DIRECTIONS: dict[str, Literal["minimize", "maximize"]] = {
    "accuracy": "maximize", "latency": "minimize", "flops": "minimize", "params": "minimize"}
METRIC = {"accuracy": "accuracy", "latency": "latency_ms", "flops": "flops", "params": "params"}


def open_storage(url: str | None, workdir: Path | None, *, heartbeat_s: int = 30,
                 grace_period_s: int = 120) -> Any:
    """An Optuna storage: ``url``, else SQLite ``<workdir>/nas.db``, else in memory.

    On a server database (PostgreSQL, MySQL) each running trial records a heartbeat every
    ``heartbeat_s`` seconds; a trial without one for ``grace_period_s`` seconds (its worker
    was killed or lost its machine) is marked failed by the next worker that starts a trial,
    and its parameters are queued once more (at most twice) for a surviving worker to run.

    Raises:
        ConfigError: the URL is malformed, its driver is missing, or the database cannot be
            reached (connections time out after 10 s rather than hang).
    """
    import optuna
    from sqlalchemy.exc import IntegrityError

    if url is None and workdir is None:
        return optuna.storages.InMemoryStorage()
    if url is None:
        assert workdir is not None
        workdir.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{workdir.resolve() / 'nas.db'}"
    sqlite = url.startswith("sqlite")
    connect = {"timeout": 60} if sqlite else {"connect_timeout": 10}  # lock wait / TCP connect
    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    callback = "heartbeat_stale_trial_callback" if retry is not None else "failed_trial_callback"
    retry = retry or optuna.storages.RetryFailedTrialCallback  # Optuna 4 names it so
    try:
        with warnings.catch_warnings():  # the heartbeat is "experimental" in Optuna 4-5
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            heartbeat: dict[str, Any] = {} if sqlite else {
                "heartbeat_interval": heartbeat_s, "grace_period": grace_period_s,
                callback: retry(max_retry=2)}
            for attempt in range(3):  # workers starting together race to create the tables
                try:
                    return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": connect},
                                                      **heartbeat)
                except IntegrityError:
                    if attempt == 2:
                        raise
                    time.sleep(0.5 + random.random())
            raise AssertionError("unreachable")
    except Exception as exc:  # noqa: BLE001 -- sqlalchemy, driver and OS errors all mean "cannot open"
        raise ConfigError(f"nas.search.storage: cannot open the Optuna storage {_redacted(url)!r}: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                          "(expected a reachable database URL such as sqlite:///path/nas.db or "
                          "postgresql://user@host/db)") from exc


def _redacted(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 -- an unparsable URL is shown as given
        return url


def make_sampler(strategy: str, genes: dict[str, tuple[Any, ...]], seed: int, trials: int) -> Any:
    """The Optuna sampler of ``strategy``: random, evolution, tpe or nsga2."""
    import optuna

    if strategy == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if strategy == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, trials // 3)))
    if strategy == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(2, min(50, trials // 3)))
    population = max(2, min(50, trials // 3))
    return _evolution_sampler(genes, seed, population, max(2, population // 3))


def _evolution_sampler(genes: dict[str, tuple[Any, ...]], seed: int, population: int, sample: int) -> Any:
    """Regularized evolution (Real et al. 2019) as an Optuna sampler, so it shares storage and workers.

    Until ``population`` trials are complete, picks are random. Then each new trial mutates one
    gene of the tournament winner (best first objective among ``sample`` trials drawn from the
    ``population`` most recent complete ones); older trials age out of the population.
    """
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState

    distributions = {name: CategoricalDistribution(list(choices)) for name, choices in genes.items()}

    class RegularizedEvolution(optuna.samplers.BaseSampler):
        def __init__(self) -> None:
            self._rng = random.Random(seed)
            self._random = optuna.samplers.RandomSampler(seed=seed)

        def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
            return distributions

        def sample_relative(self, study: Any, trial: Any, search_space: dict[str, Any]) -> dict[str, Any]:
            done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if len(done) < population or not search_space:
                return {}
            recent = sorted(done, key=lambda t: t.number)[-population:]
            sign = 1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else -1.0
            parent = max(self._rng.sample(recent, min(sample, len(recent))), key=lambda t: sign * t.values[0])
            child = dict(parent.params)
            mutable = [g for g in genes if len(genes[g]) > 1]
            if mutable:
                gene = self._rng.choice(mutable)
                child[gene] = self._rng.choice([c for c in genes[gene] if c != child[gene]])
            return child

        def sample_independent(self, study: Any, trial: Any, name: str, distribution: Any) -> Any:
            return self._random.sample_independent(study, trial, name, distribution)

    return RegularizedEvolution()


def dominates(a: Sequence[float], b: Sequence[float], maximize: Sequence[bool]) -> bool:
    """Whether ``a`` is at least as good as ``b`` in every objective and better in one."""
    better = [x > y if up else x < y for x, y, up in zip(a, b, maximize)]
    worse = [x < y if up else x > y for x, y, up in zip(a, b, maximize)]
    return any(better) and not any(worse)


def pareto_front(points: Sequence[Sequence[float]], maximize: Sequence[bool]) -> list[int]:
    """Indices of the non-dominated points, in input order."""
    return [i for i, p in enumerate(points)
            if not any(dominates(q, p, maximize) for j, q in enumerate(points) if j != i)]


def table(rows: Sequence[dict[str, Any]], metric: str = "accuracy") -> str:
    """A markdown table of trial rows: trial, the architecture's genes, score, latency, FLOPs, params."""
    fixed = ("in_channels", "num_classes")  # the same for every row of a CNN space
    genes = [k for k in (rows[0]["arch"] if rows else {}) if k not in fixed]
    lines = [f"| trial | {' | '.join(genes)} | {metric} | latency (ms) | MFLOPs | params |",
             "|---|" + "---|" * (len(genes) + 4)]
    for r in rows:
        arch = r["arch"]
        lines.append(f"| {r['trial']} | {' | '.join(str(arch[g]) for g in genes)} | "
                     f"{r['accuracy']:.4f} | {r['latency_ms']:.3f} | {r['flops'] / 1e6:.2f} | "
                     f"{r['params']:,} |")
    return "\n".join(lines)


def plot_front(rows: Sequence[dict[str, Any]], front: Sequence[dict[str, Any]],
               reference: dict[str, float] | None = None, title: str = "nas.search",
               metric: str = "accuracy") -> bytes:
    """PNG bytes of the score (``metric``) vs latency: every trial, the Pareto front joined, a reference."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.scatter([r["latency_ms"] for r in rows], [r["accuracy"] for r in rows], s=14, color="#9ab",
               label="trials")
    ordered = sorted(front, key=lambda r: r["latency_ms"])
    ax.plot([r["latency_ms"] for r in ordered], [r["accuracy"] for r in ordered], "-o", color="#3070b0",
            label="Pareto front")
    if reference is not None:
        ax.scatter([reference["latency_ms"]], [reference["accuracy"]], marker="*", s=120, color="#c03030",
                   label=str(reference.get("label", "reference")))
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def twin(study: Any, trial: Any) -> Any:
    """The first complete trial (not itself a duplicate) with ``trial``'s parameters, if any."""
    from optuna.trial import TrialState

    for other in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if other.params == trial.params and "duplicate_of" not in other.user_attrs:
            return other
    return None


def spent(study: Any) -> int:
    """Trials that count towards the budget: complete, or failed with an error (not lost with a worker)."""
    from optuna.trial import TrialState

    return sum(t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and "error" in t.user_attrs)
               for t in study.get_trials(deepcopy=False))


def write_report(rows: list[dict[str, Any]], front: list[dict[str, Any]], folder: Path, metric: str) -> None:
    """Write ``nas_trials.md`` (front and all trials) and ``plots/nas_pareto.png`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    text = (f"# nas.search trials\n\n## Pareto front\n\n{table(front, metric)}\n\n"
            "## All complete trials\n\n")
    (folder / "nas_trials.md").write_text(text + table(rows, metric) + "\n")
    try:
        png = plot_front(rows, front, metric=metric)
    except ImportError:
        logger.warning("matplotlib is not installed: nas.search writes no Pareto plot")
        return
    (folder / "plots").mkdir(exist_ok=True)
    tmp = folder / "plots" / "nas_pareto.png.tmp"
    tmp.write_bytes(png)
    tmp.replace(folder / "plots" / "nas_pareto.png")
