"""Hyperparameter search over model families on the flow's Dask cluster, one candidate per free slot.

A slot is one Dask worker (on a GPU cluster: one GPU). Each slot holds its own
copy of the train and valid slices and trains one candidate at a time with
the same :func:`conveyor.tasks.train.fit` as a plain training, so a search never puts
two trainings on one worker and never oversubscribes a GPU. Candidates are
drawn up front from a seeded generator (each family's defaults first, then
random draws), so a rerun with the same inputs and seed trains the same
candidates and picks the same winner; selection reads only validation
metrics, ties going to the earlier candidate. The winner is committed as an
ordinary model version (the version its parameters would get from a plain
training) and the search record is written last, under
``searches/<model>/<version>/search.json``, so a rerun reuses it.

The selection metric follows the task (silver manifest): ``auc`` or
``logloss`` for binary, ``mlogloss`` (or ``merror``) for multiclass, ``rmse``
for regression; ``auto`` (and the binary default ``auc`` on another task)
means the task's first. ``linear`` is binary-only, so a search of another
task skips it (recorded in the search record).
"""

from __future__ import annotations

import dataclasses
import math
import posixpath
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from conveyor.store.storage import Store, code_version, content_version, exists, read_json, write_json_atomic
from conveyor.tasks.families import FAMILIES, ForestParams
from conveyor.tasks.spec import SplitParams
from conveyor.tasks.train import (
    Fitted,
    Target,
    TrainParams,
    TrainResult,
    committed_model,
    fit,
    load_frames,
    model_version,
    resolve_device,
    resolve_split,
    silver_schema,
    write_model,
)

if TYPE_CHECKING:
    from conveyor.tasks.clean import CleanResult

SEARCH_FILE = "search.json"
# Validation metrics a search may pick by, per task (XGBoost's names); the first is the task's default.
SEARCH_METRICS: dict[str, tuple[str, ...]] = {
    "binary": ("auc", "logloss"),
    "multiclass": ("mlogloss", "merror"),
    "regression": ("rmse",),
}
HIGHER_IS_BETTER = frozenset({"auc"})
SearchMetric = Literal["auto", "auc", "logloss", "mlogloss", "merror", "rmse"]


def search_metric(requested: str, task: str) -> str:
    """The metric a search of ``task`` ranks by: ``requested`` when the task has it, else its default."""
    allowed = SEARCH_METRICS[task]
    if requested in allowed:
        return requested
    if requested == "auto" or (requested == "auc" and task != "binary"):
        return allowed[0]
    if requested == "logloss" and task == "multiclass":
        return "mlogloss"
    raise ValueError(
        f"search metric {requested!r} is not a {task} metric (choose from {list(allowed)} or auto)"
    )


@dataclass(frozen=True)
class SearchParams:
    budget: int = 6  # candidates trained, at most
    families: tuple[str, ...] = FAMILIES
    metric: SearchMetric = "auc"  # validation metric that picks the winner (see search_metric)
    parallelism: int | None = None  # concurrent candidates; None = one per worker (GPU)
    seed: int = 13

    def __post_init__(self) -> None:
        if self.budget < 1:
            raise ValueError(f"search budget must be >= 1, not {self.budget}")
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown or not self.families:
            raise ValueError(
                f"search families must be a non-empty subset of {', '.join(FAMILIES)}, "
                f"not {list(self.families)}"
            )
        if self.parallelism is not None and self.parallelism < 1:
            raise ValueError(f"search parallelism must be >= 1, not {self.parallelism}")


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def sample(rng: np.random.Generator, family: str, base: TrainParams) -> TrainParams:
    """One random draw from ``family``'s search space (around sensible ranges for tabular data)."""
    if family == "gbtree":
        return dataclasses.replace(
            base,
            family="gbtree",
            learning_rate=round(_log_uniform(rng, 0.02, 0.3), 4),
            max_depth=int(rng.integers(3, 11)),
            min_child_weight=round(_log_uniform(rng, 0.5, 50.0), 3),
            subsample=round(float(rng.uniform(0.5, 1.0)), 3),
            colsample_bytree=round(float(rng.uniform(0.4, 1.0)), 3),
        )
    if family == "random_forest":
        rf = ForestParams(
            n_trees=int(rng.choice([50, 100, 200])),
            max_depth=int(rng.integers(6, 15)),
            min_child_weight=round(_log_uniform(rng, 1.0, 50.0), 3),
            subsample=round(float(rng.uniform(0.4, 0.9)), 3),
            colsample_bynode=round(float(rng.uniform(0.3, 0.9)), 3),
        )
        return dataclasses.replace(base, family="random_forest", random_forest=rf)
    lin = dataclasses.replace(base.linear, l2=float(f"{_log_uniform(rng, 1e-6, 1e-1):.3g}"))
    return dataclasses.replace(base, family="linear", linear=lin)


def candidates(search: SearchParams, base: TrainParams) -> list[TrainParams]:
    """The search's candidates, in order: each family's defaults (from ``base``), then seeded random draws."""
    rng = np.random.default_rng(search.seed)
    out = [dataclasses.replace(base, family=f) for f in search.families][: search.budget]
    i = 0
    while len(out) < search.budget:
        family = search.families[i % len(search.families)]
        draw = sample(rng, family, base)
        if all(draw.identity() != c.identity() for c in out):
            out.append(draw)
        i += 1
        if i > 100 * search.budget:  # a space too small to fill the budget with distinct candidates
            break
    return out


def expected_cost(params: TrainParams) -> float:
    """A rough relative training cost, only to start the longest candidates first (LPT scheduling).

    Trees cost about (trees grown) x (leaves per tree); boosting grows about
    ``1 / learning_rate`` rounds x a constant before early stopping. The order
    of starts never affects which candidate wins.
    """
    if params.family == "linear":
        return 1.0
    if params.family == "random_forest":
        return params.random_forest.n_trees * 2.0 ** min(params.random_forest.max_depth, 12) / 64
    return (6.0 / params.learning_rate) * 2.0 ** min(params.max_depth, 12) / 64


@dataclass(frozen=True)
class Candidate:
    candidate: int
    family: str
    hyperparameters: dict[str, Any]
    valid_auc: float
    valid_logloss: float
    best_iteration: int
    seconds: float
    slot: str
    version: str  # the model version these parameters map to
    valid_metrics: dict[str, float] = field(default_factory=dict)


def _score(c: Candidate, metric: str) -> float:
    value = c.valid_metrics.get(metric, c.valid_auc if metric == "auc" else c.valid_logloss)
    value = value if metric in HIGHER_IS_BETTER else -value
    return value if math.isfinite(value) else -math.inf


def rank(board: list[Candidate], metric: str) -> list[Candidate]:
    """Best first by the validation metric; ties go to the earlier candidate (deterministic)."""
    return sorted(board, key=lambda c: (-_score(c, metric), c.candidate))


def search_version(cleaned: CleanResult, search: SearchParams, base: TrainParams, split: SplitParams) -> str:
    return content_version(
        "search",
        cleaned.silver.version,
        asdict(search),
        base.identity(),
        asdict(base.random_forest),
        asdict(base.linear),
        asdict(split),
        code_version("train", "search"),
    )


def search_url(store: Store, model: str, version: str) -> str:
    return posixpath.join(store.root, "searches", model, version, SEARCH_FILE)


def slots(client: Any) -> list[str]:
    """One slot per worker: on a dask-cuda cluster each worker owns one GPU."""
    return sorted(client.scheduler_info(n_workers=-1)["workers"])


def run_search(
    store: Store,
    cleaned: CleanResult,
    client: Any,
    search: SearchParams,
    base: TrainParams = TrainParams(),
    split: SplitParams | None = None,
    model: str = "flights_late",
) -> TrainResult:
    """Train up to ``search.budget`` candidates in parallel slots and commit the best as a model version."""
    schema = silver_schema(store, cleaned.silver.url)
    target = Target.of(schema)
    metric = search_metric(search.metric, schema.task)
    families = tuple(f for f in search.families if f != "linear" or schema.task == "binary")
    skipped = {f: f"binary-only; this task is {schema.task}" for f in search.families if f not in families}
    if not families:
        raise ValueError(f"search families {list(search.families)} has none for a {schema.task} task")
    search = dataclasses.replace(search, families=families, metric=metric)
    split = resolve_split(store, cleaned, split)
    version = search_version(cleaned, search, base, split)
    record_url = search_url(store, model, version)
    if exists(store, record_url):
        record = read_json(store, record_url)
        done = committed_model(store, store.model_url(model, record["winner_version"]))
        if done is not None:
            return dataclasses.replace(done, reused=True, search=record)

    started = time.perf_counter()
    device = resolve_device(client, base.device)
    todo = candidates(search, base)
    workers = slots(client)
    width = min(len(workers), search.parallelism or len(workers), len(todo))
    workers = workers[:width]
    # Each slot gets its own copy of the data, so a candidate trains where its data is.
    placed = {w: load_frames(store, client, cleaned, split, place_on=w) for w in workers}
    rows = placed[workers[0]][1]
    free: list[str] = list(workers)
    lock = threading.Condition()
    fitted: dict[int, Fitted] = {}

    def run(i: int, params: TrainParams) -> Candidate:
        with lock:
            lock.wait_for(lambda: bool(free))
            slot = free.pop(0)
        try:
            t0 = time.perf_counter()
            result = fit(
                client,
                placed[slot][0],
                schema.features,
                schema.categories,
                params,
                device,
                workers=[slot],
                target=target,
            )
            seconds = time.perf_counter() - t0
        finally:
            with lock:
                free.append(slot)
                lock.notify()
        fitted[i] = result
        return Candidate(
            i,
            params.family,
            params.identity(),
            result.valid_auc,
            result.valid_logloss,
            result.best_iteration,
            round(seconds, 3),
            slot,
            model_version(cleaned, params, split),
            dict(result.valid_metrics),
        )

    # Longest first, so one long candidate does not start last and leave the other slots idle.
    order = sorted(range(len(todo)), key=lambda i: (-expected_cost(todo[i]), i))
    with ThreadPoolExecutor(max_workers=width, thread_name_prefix="conveyor-search") as pool:
        done = {i: pool.submit(run, i, todo[i]) for i in order}
        board = [done[i].result() for i in range(len(todo))]
    placed.clear()  # drop the slot copies: their futures are released on the workers
    ranked = rank(board, search.metric)
    best = ranked[0]
    record = {
        "version": version,
        "budget": search.budget,
        "families": list(search.families),
        "metric": search.metric,
        "skipped_families": skipped,
        "seed": search.seed,
        "parallelism": width,
        "device": device,
        "seconds": round(time.perf_counter() - started, 3),
        "winner": best.candidate,
        "winner_version": best.version,
        "leaderboard": [asdict(c) for c in ranked],
        "url": record_url,
    }
    winner = todo[best.candidate]
    trained = committed_model(store, store.model_url(model, best.version))
    if trained is None:
        trained = write_model(
            store,
            cleaned,
            winner,
            split,
            model,
            device,
            fitted[best.candidate],
            rows,
            best.seconds,
            search=record,
        )
    else:
        trained = dataclasses.replace(trained, search=record)
    write_json_atomic(store, record_url, record)  # last: the search is complete
    return trained


@dataclass(frozen=True)
class SearchSummary:
    """What the flow logs and publishes as a table artifact."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def of(cls, record: dict[str, Any]) -> SearchSummary:
        out = []
        for rank_, c in enumerate(record.get("leaderboard", []), start=1):
            params = {k: v for k, v in c["hyperparameters"].items() if k not in {"family", "seed"}}
            out.append(
                {
                    "rank": rank_,
                    "candidate": c["candidate"],
                    "family": c["family"],
                    **{
                        f"valid_{m}": round(v, 5)
                        for m, v in (
                            c.get("valid_metrics") or {"auc": c["valid_auc"], "logloss": c["valid_logloss"]}
                        ).items()
                    },
                    "rounds": c["best_iteration"] + 1,
                    "seconds": c["seconds"],
                    "slot": c["slot"],
                    "winner": c["candidate"] == record.get("winner"),
                    "hyperparameters": ", ".join(f"{k}={v}" for k, v in params.items()),
                }
            )
        return cls(out)
