"""Train: one model family on the Dask cluster, the spec's split, early stopping on the validation slice.

What is learnt comes from the silver manifest (:class:`~conveyor.tasks.spec.SilverSchema`):
the features, their category levels, the label and the task. ``binary`` trains
``binary:logistic`` (stopping on AUC), ``multiclass`` ``multi:softprob``
(stopping on mlogloss), ``regression`` ``reg:squarederror`` (stopping on RMSE).
Families (``TrainParams.family``): ``gbtree`` (boosted trees) and
``random_forest`` with ``xgboost.dask`` for every task; ``linear`` (logistic
regression, see tasks/families.py, by L-BFGS map-reduce over the same
partitions) for ``binary`` only.

Data bigger than ``TrainParams.external_memory_rows`` silver rows trains the
trees with XGBoost's external memory instead (:func:`fit_external`): one Dask
task streams the silver parts through an ``ExtMemQuantileDMatrix`` whose
quantised pages are cached on the worker's disk, so no process holds the
training matrix. ``xgboost.dask`` cannot take an external-memory matrix, hence
one worker with the threads of every worker on its host.

The model is written (XGBoost UBJ for trees, JSON weights for the linear
model; never pickle) under ``models/<model>/<version>/`` with ``train.json`` beside it; the version is not
trusted (not in the
registry) until deploy writes its ``card.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import posixpath
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import dask
import numpy as np
import pandas as pd

from conveyor.resources import gpu_count
from conveyor.store.storage import (
    Store,
    code_version,
    content_version,
    exists,
    open_manifest,
    part_urls,
    read_dataset,
    read_json,
    write_bytes_atomic,
    write_json_atomic,
)
from conveyor.tasks.families import (
    FAMILIES,
    LINEAR_FILE,
    Family,
    ForestParams,
    LinearModel,
    LinearParams,
    fit_linear,
)
from conveyor.tasks.spec import FOLD, SilverSchema, SplitParams, Task

if TYPE_CHECKING:
    import dask.dataframe as dd

    from conveyor.tasks.clean import CleanResult

MODEL_FILE = "model.ubj"
TRAIN_INFO = "train.json"
SPREAD_LAZY_FACTOR = 8  # partitions per worker from which a slice is left to the scheduler (see spread)
# Silver rows from which trees train from external memory. In memory, the train stage's processes held
# about 0.2 GiB per million rows (3.35 GiB at 10M, 20.96 GiB at 100M: benchmarks/README.md); external
# memory holds one batch plus XGBoost's page cache. A row count, not free memory, so the same data trains
# the same way (and gives the same model) on any machine.
EXTERNAL_MEMORY_ROWS = 20_000_000
EXTERNAL_BATCH_ROWS = 1_000_000  # rows per batch read from a silver part (bounds the reading memory)

# What a silver manifest written before pipeline specs (no 'task' in its extra) means: the flights pipeline.
LEGACY_SCHEMA: dict[str, Any] = {
    "spec": "flights",
    "label": "is_late",
    "task": "binary",
    "classes": ["on time", "late"],
    "categorical": ["carrier", "origin", "dest"],
    "time_key": "sched_dep",
    "baseline_keys": ["carrier", "sched_dep_hour"],
    "gate_metric": "roc_auc",
}
# Per task: the objective and the validation metrics XGBoost reports; early stopping uses the last one.
OBJECTIVES: dict[str, tuple[str, list[str]]] = {
    "binary": ("binary:logistic", ["logloss", "auc"]),
    "multiclass": ("multi:softprob", ["merror", "mlogloss"]),
    "regression": ("reg:squarederror", ["rmse"]),
}


def silver_schema(store: Store, silver_url: str) -> SilverSchema:
    """What clean committed about the silver data: features, levels, label, task, split, baseline, gate.

    A manifest from before pipeline specs (no ``task`` in its extra) is the
    flights pipeline, read with its values of that time (:data:`LEGACY_SCHEMA`).
    """
    extra = open_manifest(store, silver_url).extra
    if "task" in extra:
        return SilverSchema.from_extra(extra)
    features = list(extra["features"])
    legacy = LEGACY_SCHEMA
    time_key = extra.get("time_key", legacy["time_key"])
    return SilverSchema(
        spec=legacy["spec"],
        spec_version="",
        features=features,
        categorical=[c for c in legacy["categorical"] if c in features],
        categories=extra["categories"],
        label=extra.get("label", legacy["label"]),
        task=legacy["task"],
        classes=list(legacy["classes"]),
        time_key=time_key,
        split=asdict(SplitParams(time_key=time_key)),
        baseline_keys=list(legacy["baseline_keys"]),
        gate_metric=legacy["gate_metric"],
    )


@dataclass(frozen=True)
class Target:
    """What a model learns: the label column, the task and (classification) the class names in code order."""

    label: str = LEGACY_SCHEMA["label"]
    task: Task = "binary"
    classes: tuple[str, ...] = tuple(LEGACY_SCHEMA["classes"])

    @classmethod
    def of(cls, schema: SilverSchema) -> Target:
        return cls(schema.label, schema.task, tuple(schema.classes))

    @property
    def num_class(self) -> int:
        return len(self.classes) if self.task == "multiclass" else 0


@dataclass(frozen=True)
class TrainParams:
    """One training: the family, its hyperparameters, the seed and the device.

    The flat fields are the boosted trees' (``gbtree``); ``random_forest`` and
    ``linear`` carry their own. Only the chosen family's settings enter the
    model version, so tuning the forest never invalidates a boosted model.
    """

    num_boost_round: int = 400
    learning_rate: float = 0.1
    max_depth: int = 8
    min_child_weight: float = 5.0
    subsample: float = 0.8
    colsample_bytree: float = 0.8
    max_cat_to_onehot: int = 4
    early_stopping_rounds: int = 25
    seed: int = 13
    device: Literal["auto", "cpu", "cuda"] = "auto"
    family: Family = "gbtree"
    # Trees train from external memory when the silver data has more rows than this (0: always). Like the
    # device, it picks how the model is trained, not what: it is not part of the model version.
    external_memory_rows: int = EXTERNAL_MEMORY_ROWS
    random_forest: ForestParams = field(default_factory=ForestParams)
    linear: LinearParams = field(default_factory=LinearParams)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {', '.join(FAMILIES)}, not {self.family!r}")

    def hyperparameters(self) -> dict[str, Any]:
        """The chosen family's settings (what the model version and the leaderboard record)."""
        if self.family == "random_forest":
            return asdict(self.random_forest)
        if self.family == "linear":
            return asdict(self.linear)
        flat = asdict(self)
        return {
            k: flat[k]
            for k in (
                "num_boost_round",
                "learning_rate",
                "max_depth",
                "min_child_weight",
                "subsample",
                "colsample_bytree",
                "max_cat_to_onehot",
                "early_stopping_rounds",
            )
        }

    def identity(self) -> dict[str, Any]:
        """What the model version hashes: family, its settings and the seed (not the device or engine)."""
        return {"family": self.family, "seed": self.seed, **self.hyperparameters()}

    def engine(self, silver_rows: int) -> str:
        """``external_memory`` for trees on data above the threshold, else ``dask`` (in worker memory).

        The threshold is a request: the operator's CONVEYOR_MAX_IN_MEMORY_ROWS bounds it, so a run form
        cannot put more rows in worker memory than the machines were sized for (it may ask for less)."""
        from conveyor.operator import current

        threshold = min(self.external_memory_rows, current().max_in_memory_rows)
        if self.family != "linear" and silver_rows > threshold:
            return "external_memory"
        return "dask"


@dataclass(frozen=True)
class TrainResult:
    model: str
    version: str
    model_url: str  # the folder of this model version
    best_iteration: int
    valid_logloss: float  # binary: logloss, multiclass: mlogloss, regression: NaN
    valid_auc: float  # binary only (NaN otherwise)
    train_rows: int
    valid_rows: int
    device: str
    features: list[str]
    categories: dict[str, list[str]]
    seconds: float
    xgb_params: dict[str, Any] = field(default_factory=dict)
    split: dict[str, str] = field(default_factory=dict)
    silver_version: str = ""
    model_bytes: int = -1
    model_sha256: str = ""
    reused: bool = False  # found committed from an earlier run, not retrained
    family: str = "gbtree"
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    model_file: str = MODEL_FILE  # model.ubj (XGBoost) or model.json (linear)
    search: dict[str, Any] = field(
        default_factory=dict
    )  # set when a search picked this model (tasks/search.py)
    label: str = LEGACY_SCHEMA["label"]
    task: str = "binary"
    classes: list[str] = field(default_factory=lambda: list(LEGACY_SCHEMA["classes"]))
    valid_metrics: dict[str, float] = field(default_factory=dict)  # XGBoost's names: auc, mlogloss, rmse, ...
    engine: str = "dask"  # "dask" (xgboost.dask, in worker memory) or "external_memory" (see fit_external)

    @property
    def target(self) -> Target:
        return Target(self.label, self.task, tuple(self.classes))


def workers_have_gpus(client: Any) -> bool:
    counts = client.run(gpu_count)
    return bool(counts) and all(c > 0 for c in counts.values())


def encode(
    frame: pd.DataFrame, categories: dict[str, list[str]], features: list[str] | None = None
) -> pd.DataFrame:
    """Replace categoricals by their code in the manifest's category list (unknown or missing -> NaN).

    The categorical columns are the keys of ``categories``; every other column
    of ``features`` (default: of the frame) is numeric and becomes float32.
    Integer codes with ``feature_types="c"`` keep XGBoost's native categorical
    splits without asking every Dask worker to infer categories from its own
    partitions (which fails on a worker that holds none).
    """
    out = frame.copy()
    for col, levels in categories.items():
        if col in out.columns:
            values = out[col].astype("string")
            values = values.where(values.isin(levels))  # unseen -> NA, as before
            codes = pd.Categorical(values, categories=levels).codes
            out[col] = np.where(codes < 0, np.nan, codes).astype("float32")
    # Numeric features as float32: what XGBoost computes in anyway, half the worker memory of float64.
    for col in out.columns if features is None else features:
        if col in out.columns and col not in categories and out[col].dtype != "float32":
            out[col] = pd.to_numeric(out[col], errors="coerce").astype("float32")
    return out


def categorize(
    frame: dd.DataFrame | pd.DataFrame, categories: dict[str, list[str]], features: list[str] | None = None
):
    """Encode categoricals of a dask or pandas frame with the recorded categories (see :func:`encode`)."""
    if isinstance(frame, pd.DataFrame):
        return encode(frame, categories, features)
    return frame.map_partitions(encode, categories, features, meta=encode(frame._meta, categories, features))


def spread(client: Any, frame: dd.DataFrame) -> tuple[dd.DataFrame, int]:
    """``frame`` without its empty partitions, placed so every worker holds some; and its row count.

    A time slice usually sits in a few input partitions, and XGBoost trains on
    the partitions where they lie: left to the scheduler, a small slice can land
    on one worker and leave the others with an empty DMatrix. So a slice with
    few partitions is placed round-robin, one copy, computed where it is placed
    (repartitioned first when it has fewer partitions than workers). A slice
    with many partitions (big data) stays lazy: its reads spread over every
    worker anyway and ``xgboost.dask`` persists it once, which is what kept
    100M rows in memory here (benchmarks/README.md).
    """
    # One partition per stored part, counted and indexed on the optimised frame: dask's planner fuses
    # parts smaller than its minimum size when it optimises, and indexing the partitions of the frame
    # as read then picked the wrong ones (seen: an empty validation slice, training stopped at round 0).
    with dask.config.set({"dataframe.parquet.minimum-partition-size": 1}):
        frame = frame.optimize()
        lengths = frame.map_partitions(len).compute().tolist()
        rows = int(sum(lengths))
        non_empty = [i for i, n in enumerate(lengths) if n]
        if not non_empty:
            return frame, 0
        frame = frame.partitions[non_empty]
        workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
        if len(non_empty) >= SPREAD_LAZY_FACTOR * len(workers):
            return frame, rows
        if len(non_empty) < len(workers) and rows >= len(workers):
            frame = frame.repartition(npartitions=len(workers))
        placed = [
            client.compute(part, workers=[workers[i % len(workers)]])
            for i, part in enumerate(frame.to_delayed())
        ]
    import dask.dataframe as dd  # here: a run whose stages are all reused never imports it

    return dd.from_delayed(placed, meta=frame._meta, verify_meta=False), rows


def feature_types(features: list[str], categorical: Any = ()) -> list[str]:
    """XGBoost's type per feature: ``c`` for the categorical ones (coded by :func:`encode`), else ``q``."""
    return ["c" if f in categorical else "q" for f in features]


def _cutoff(dtype: Any, value: Any) -> Any:
    """A split boundary comparable with a time column of ``dtype`` (tz-aware, naive, or a number)."""
    if pd.api.types.is_datetime64_any_dtype(dtype):
        ts = pd.Timestamp(value)
        tz = getattr(dtype, "tz", None)
        if tz is None:
            return ts.tz_convert(None) if ts.tzinfo is not None else ts
        return ts.tz_localize(tz) if ts.tzinfo is None else ts.tz_convert(tz)
    if pd.api.types.is_numeric_dtype(dtype):
        return float(value)
    return value


def split_mask(frame: dd.DataFrame, split: SplitParams, part: Literal["train", "valid", "holdout"]) -> Any:
    """Which rows of ``frame`` are in ``part``: by ``split.time_key`` cut-offs or by the ``_fold`` column."""
    if split.kind == "ratio":
        fold, cut = frame[FOLD], split.train + split.valid
        return {
            "train": fold < split.train,
            "valid": (fold >= split.train) & (fold < cut),
            "holdout": fold >= cut,
        }[part]
    when = frame[split.time_key]
    t_end, v_end = _cutoff(when.dtype, split.train_end), _cutoff(when.dtype, split.valid_end)
    return {"train": when < t_end, "valid": (when >= t_end) & (when < v_end), "holdout": when >= v_end}[part]


def load_split(
    store: Store,
    silver_url: str,
    split: SplitParams | None,
    part: Literal["train", "valid", "holdout"],
    columns: list[str],
    encode: bool = True,
    schema: SilverSchema | None = None,
) -> dd.DataFrame:
    """One slice of the silver data (``split``, default the schema's); categoricals encoded with the
    dataset's categories unless ``encode=False``."""
    schema = schema or silver_schema(store, silver_url)
    split = split or schema.split_params()
    key = FOLD if split.kind == "ratio" else split.time_key
    frame = read_dataset(store, silver_url, columns=list(dict.fromkeys([key, *columns])))
    frame = frame[split_mask(frame, split, part)][columns]
    return categorize(frame, schema.categories, schema.features) if encode else frame


def xgb_params(params: TrainParams, device: str, target: Target = Target()) -> dict[str, Any]:
    """The booster's parameters: the task's objective and validation metrics, then the family's settings."""
    objective, metrics = OBJECTIVES[target.task]
    common = {
        "objective": objective,
        "eval_metric": list(metrics),
        "tree_method": "hist",
        "device": device,
        "seed": params.seed,
    }
    if target.task == "multiclass":
        common["num_class"] = target.num_class
    if params.family == "random_forest":
        rf = params.random_forest
        return common | {
            "num_parallel_tree": rf.n_trees,
            "learning_rate": 1.0,  # one round of averaged trees: no shrinkage
            "max_depth": rf.max_depth,
            "min_child_weight": rf.min_child_weight,
            "subsample": rf.subsample,
            "colsample_bynode": rf.colsample_bynode,
            "max_cat_to_onehot": rf.max_cat_to_onehot,
        }
    if params.family != "gbtree":
        raise ValueError(f"{params.family} is not an XGBoost booster family")
    return common | {
        "learning_rate": params.learning_rate,
        "max_depth": params.max_depth,
        "min_child_weight": params.min_child_weight,
        "subsample": params.subsample,
        "colsample_bytree": params.colsample_bytree,
        "max_cat_to_onehot": params.max_cat_to_onehot,
    }


@dataclass(frozen=True)
class Fitted:
    """A fitted model before it is written: what train() and each search candidate produce."""

    model: Any  # xgboost.Booster or LinearModel
    raw: bytes
    model_file: str
    best_iteration: int
    # At the kept round, by XGBoost's names (auc, logloss, mlogloss, rmse, ...).
    valid_metrics: dict[str, float]
    settings: dict[str, Any]  # the booster params, or the linear model's

    @property
    def valid_logloss(self) -> float:
        return self.valid_metrics.get("logloss", self.valid_metrics.get("mlogloss", math.nan))

    @property
    def valid_auc(self) -> float:
        return self.valid_metrics.get("auc", math.nan)


def resolve_device(client: Any, device: str) -> str:
    if device == "auto":
        return "cuda" if workers_have_gpus(client) else "cpu"
    return device


def check_family(family: str, task: str) -> None:
    """The linear model is a logistic regression: binary only."""
    if family == "linear" and task != "binary":
        raise ValueError(
            f"model family 'linear' (logistic regression) is binary-only; this pipeline's task is {task!r}: "
            "use 'gbtree' or 'random_forest'"
        )


def fit(
    client: Any,
    frames: dict[str, dd.DataFrame],
    features: list[str],
    categories: dict[str, list[str]],
    params: TrainParams,
    device: str,
    workers: list[str] | None = None,
    target: Target = Target(),
) -> Fitted:
    """Fit ``params.family`` for ``target`` on the train frame, stopping early on the valid frame.

    Trees train with ``xgboost.dask`` on the workers that hold the partitions
    (all of them after :func:`spread`). Given one worker (a search slot, after
    :func:`place`), they train in one Dask task restricted to that worker, so
    nothing of the candidate can land on another slot. The linear model's
    map-reduce runs where its partitions are, restricted to ``workers``.
    """
    import xgboost as xgb
    import xgboost.dask  # noqa: F401  (``import xgboost`` does not import the dask module)

    check_family(params.family, target.task)
    if params.family == "linear":
        return _fit_linear(client, frames, features, categories, params, workers, target.label)
    if workers is not None and len(workers) == 1:
        return _fit_booster_on(client, workers[0], frames, features, categories, params, device, target)
    types = feature_types(features, categories)
    dtrain = xgb.dask.DaskQuantileDMatrix(
        client,
        frames["train"][features],
        frames["train"][target.label],
        feature_types=types,
        enable_categorical=True,
    )
    dvalid = xgb.dask.DaskQuantileDMatrix(
        client,
        frames["valid"][features],
        frames["valid"][target.label],
        feature_types=types,
        enable_categorical=True,
        ref=dtrain,
    )
    booster_params = xgb_params(params, device, target)
    forest = params.family == "random_forest"
    output = xgb.dask.train(
        client,
        booster_params,
        dtrain,
        num_boost_round=1 if forest else params.num_boost_round,
        evals=[(dvalid, "valid")],
        early_stopping_rounds=None if forest else params.early_stopping_rounds,
        verbose_eval=False,
    )
    booster: xgb.Booster = output["booster"]
    history = output["history"]["valid"]
    best = 0 if forest else int(booster.best_iteration)
    if not forest:  # keep only the rounds up to the best one: what is saved is what was validated
        booster = booster[: best + 1]
    return Fitted(
        booster,
        bytes(booster.save_raw(raw_format="ubj")),
        MODEL_FILE,
        best,
        {m: float(history[m][best]) for m in booster_params["eval_metric"]},
        booster_params,
    )


def _train_early_stopped(
    booster_params: dict[str, Any],
    dtrain: Any,
    dvalid: Any,
    rounds: int,
    early_stopping: int | None,
    nthread: int,
) -> tuple[Any, int, dict[str, float]]:
    """``xgb.train`` in one process (in memory or external memory): the booster cut at its best round,
    that round, and the validation metrics there."""
    import xgboost as xgb

    history: dict[str, Any] = {}
    booster = xgb.train(
        booster_params | {"nthread": nthread},
        dtrain,
        num_boost_round=rounds,
        evals=[(dvalid, "valid")],
        early_stopping_rounds=early_stopping,
        evals_result=history,
        verbose_eval=False,
    )
    best = int(booster.best_iteration) if early_stopping else 0
    if early_stopping:
        booster = booster[: best + 1]
    return booster, best, {m: float(history["valid"][m][best]) for m in booster_params["eval_metric"]}


def _booster_on_worker(
    train_parts: list[pd.DataFrame],
    valid_parts: list[pd.DataFrame],
    features: list[str],
    categorical: list[str],
    label: str,
    booster_params: dict[str, Any],
    rounds: int,
    early_stopping: int | None,
) -> tuple[bytes, int, dict[str, float]]:
    """Train one booster inside a Dask task with the worker's threads (one search candidate on its slot)."""
    import xgboost as xgb
    from distributed import get_worker

    types = feature_types(features, categorical)
    train_frame, valid_frame = pd.concat(train_parts), pd.concat(valid_parts)
    nthread = get_worker().state.nthreads
    dtrain = xgb.QuantileDMatrix(
        train_frame[features],
        train_frame[label],
        feature_types=types,
        enable_categorical=True,
        nthread=nthread,
    )
    dvalid = xgb.QuantileDMatrix(
        valid_frame[features],
        valid_frame[label],
        feature_types=types,
        enable_categorical=True,
        nthread=nthread,
        ref=dtrain,
    )
    booster, best, metrics = _train_early_stopped(
        booster_params, dtrain, dvalid, rounds, early_stopping, nthread
    )
    return bytes(booster.save_raw(raw_format="ubj")), best, metrics


def _fit_booster_on(
    client: Any,
    worker: str,
    frames: dict[str, dd.DataFrame],
    features: list[str],
    categories: dict[str, list[str]],
    params: TrainParams,
    device: str,
    target: Target,
) -> Fitted:
    booster_params = xgb_params(params, device, target)
    forest = params.family == "random_forest"
    where = {"workers": [worker], "allow_other_workers": False}
    parts = {p: client.compute(f.to_delayed(), **where) for p, f in frames.items()}
    try:
        raw, best, metrics = client.submit(
            _booster_on_worker,
            parts["train"],
            parts["valid"],
            features,
            list(categories),
            target.label,
            booster_params,
            1 if forest else params.num_boost_round,
            None if forest else params.early_stopping_rounds,
            pure=False,
            **where,
        ).result()
    finally:
        for futures in parts.values():
            for f in futures:
                f.release()
    return Fitted(load_raw(raw), raw, MODEL_FILE, best, metrics, booster_params)


def _fit_linear(
    client: Any,
    frames: dict[str, dd.DataFrame],
    features: list[str],
    categories: dict[str, list[str]],
    params: TrainParams,
    workers: list[str] | None,
    label: str,
) -> Fitted:
    from sklearn.metrics import roc_auc_score

    where = {"workers": workers, "allow_other_workers": False} if workers else {}
    parts = {p: client.compute(f[[*features, label]].to_delayed(), **where) for p, f in frames.items()}
    categorical = [c for c in features if c in categories]
    try:
        result = fit_linear(
            client,
            parts["train"],
            parts["valid"],
            features,
            categorical,
            {c: len(categories[c]) for c in categorical},
            label,
            params.linear,
            workers,
        )
        scored = client.gather(
            [
                client.submit(
                    lambda part, m: (m.inplace_predict(part), part[label].to_numpy()),
                    p,
                    result.model,
                    pure=False,
                    **where,
                )
                for p in parts["valid"]
            ]
        )
    finally:
        for futures in parts.values():
            for f in futures:
                f.release()
    p_valid = np.concatenate([s[0] for s in scored])
    y_valid = np.concatenate([s[1] for s in scored]).astype(int)
    auc = float(roc_auc_score(y_valid, p_valid)) if len(np.unique(y_valid)) == 2 else float("nan")
    return Fitted(
        result.model,
        result.model.to_bytes(),
        LINEAR_FILE,
        result.best_iteration,
        {"logloss": result.valid_logloss, "auc": auc},
        asdict(params.linear) | {"iterations": result.iterations},
    )


@functools.cache
def _silver_batches_class() -> type:
    """:class:`SilverBatches`, defined on first use: xgboost is imported only by code that trains or
    predicts (a rerun that reuses every stage never imports it, nor scikit-learn through it)."""
    import xgboost as xgb

    class SilverBatches(xgb.DataIter):
        """One slice of the silver parts as batches of encoded rows, read one at a time (external memory).

        XGBoost calls :meth:`next` until it returns False, once to sketch the
        quantiles and once to write its quantised pages; only the current batch
        is held. Parts are read through the store's filesystem, so any store works.
        """

        def __init__(
            self,
            store: Store,
            parts: list[str],
            split: SplitParams,
            part: Literal["train", "valid", "holdout"],
            features: list[str],
            label: str,
            categories: dict[str, list[str]],
            cache_prefix: str,
            on_host: bool = False,
            batch_rows: int = EXTERNAL_BATCH_ROWS,
        ):
            self.store, self.parts, self.split, self.part = store, parts, split, part
            self.features, self.label, self.categories = features, label, categories
            self.batch_rows = batch_rows
            self.rows = 0  # counted on the first pass
            self._counting = True
            self._batches: Iterator[pd.DataFrame] | None = None
            super().__init__(cache_prefix=cache_prefix, release_data=True, on_host=on_host)

        def _read(self) -> Iterator[pd.DataFrame]:
            import pyarrow.parquet as pq

            key = FOLD if self.split.kind == "ratio" else self.split.time_key
            columns = list(dict.fromkeys([key, *self.features, self.label]))
            for url in self.parts:
                with self.store.fs.open(self.store.path(url), "rb") as fh:
                    for batch in pq.ParquetFile(fh).iter_batches(batch_size=self.batch_rows, columns=columns):
                        frame = batch.to_pandas()
                        frame = frame[split_mask(frame, self.split, self.part)]
                        if len(frame):
                            yield encode(frame[[*self.features, self.label]], self.categories, self.features)

        def next(self, input_data: Any) -> bool:
            if self._batches is None:
                self._batches = self._read()
            frame = next(self._batches, None)
            if frame is None:
                self._counting = False
                return False
            if self._counting:
                self.rows += len(frame)
            input_data(
                data=frame[self.features],
                label=frame[self.label],
                feature_types=feature_types(self.features, self.categories),
            )
            return True

        def reset(self) -> None:
            if self._batches is not None:
                self._batches.close()
            self._batches = None

    return SilverBatches


def __getattr__(name: str) -> Any:  # PEP 562: ``train.SilverBatches`` without importing xgboost at import
    if name == "SilverBatches":
        return _silver_batches_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def train_external(
    store: Store,
    parts: list[str],
    split: SplitParams,
    features: list[str],
    categories: dict[str, list[str]],
    label: str,
    booster_params: dict[str, Any],
    rounds: int,
    early_stopping: int | None,
    nthread: int,
    cache_dir: str | None = None,
) -> tuple[bytes, int, dict[str, float], dict[str, int]]:
    """Train one booster from the silver parts through XGBoost's external memory (pages cached on disk).

    Returns the model (UBJ), the kept round, the validation metrics at that
    round and the rows of the train and valid slices.
    """
    import xgboost as xgb

    on_host = booster_params.get("device") == "cuda"  # GPU: pages in host memory; CPU: on disk
    with tempfile.TemporaryDirectory(prefix="conveyor-extmem-", dir=cache_dir) as cache:
        iters = {
            p: _silver_batches_class()(
                store, parts, split, p, features, label, categories, os.path.join(cache, p), on_host
            )
            for p in ("train", "valid")
        }
        dtrain = xgb.ExtMemQuantileDMatrix(iters["train"], enable_categorical=True, nthread=nthread)
        if iters["train"].rows == 0:
            raise ValueError(f"the train slice of the {split.kind} split {split} is empty")
        dvalid = xgb.ExtMemQuantileDMatrix(
            iters["valid"], enable_categorical=True, nthread=nthread, ref=dtrain
        )
        if iters["valid"].rows == 0:
            raise ValueError(f"the valid slice of the {split.kind} split {split} is empty")
        booster, best, metrics = _train_early_stopped(
            booster_params, dtrain, dvalid, rounds, early_stopping, nthread
        )
        rows = {p: it.rows for p, it in iters.items()}
        del dtrain, dvalid  # free the page cache before its folder goes
    return bytes(booster.save_raw(raw_format="ubj")), best, metrics, rows


def _train_external_on_worker(*args: Any) -> tuple[bytes, int, dict[str, float], dict[str, int]]:
    from distributed import get_worker

    return train_external(*args, cache_dir=get_worker().local_directory)


def fit_external(
    store: Store,
    client: Any,
    silver_url: str,
    split: SplitParams,
    schema: SilverSchema,
    params: TrainParams,
    device: str,
) -> tuple[Fitted, dict[str, int]]:
    """Train trees from external memory in one Dask task, with the threads of every worker on its host.

    The other workers sit idle meanwhile: their threads are the ones XGBoost uses.
    """
    target = Target.of(schema)
    booster_params = xgb_params(params, device, target)
    forest = params.family == "random_forest"
    workers = client.scheduler_info(n_workers=-1)["workers"]
    worker = sorted(workers)[0]
    host = workers[worker]["host"]
    nthread = sum(w["nthreads"] for w in workers.values() if w["host"] == host)
    parts = part_urls(store, silver_url, open_manifest(store, silver_url))
    raw, best, metrics, rows = client.submit(
        _train_external_on_worker,
        store,
        parts,
        split,
        list(schema.features),
        schema.categories,
        target.label,
        booster_params,
        1 if forest else params.num_boost_round,
        None if forest else params.early_stopping_rounds,
        nthread,
        pure=False,
        workers=[worker],
        allow_other_workers=False,
    ).result()
    return Fitted(load_raw(raw), raw, MODEL_FILE, best, metrics, booster_params), rows


def resolve_split(store: Store, cleaned: CleanResult, split: SplitParams | None) -> SplitParams:
    """The split asked for, else the one the spec declared (in the silver manifest)."""
    return split or silver_schema(store, cleaned.silver.url).split_params()


def model_version(cleaned: CleanResult, params: TrainParams, split: SplitParams) -> str:
    # The device is not part of the version: the same data and params give the same model.
    return content_version(
        "train", cleaned.silver.version, params.identity(), asdict(split), code_version("train")
    )


def load_frames(
    store: Store, client: Any, cleaned: CleanResult, split: SplitParams, place_on: str | None = None
) -> tuple[dict[str, dd.DataFrame], dict[str, int]]:
    """Train and valid slices, persisted: spread over every worker, or all on ``place_on``."""
    schema = silver_schema(store, cleaned.silver.url)
    frames, rows = {}, {}
    for p in ("train", "valid"):
        frame = load_split(
            store, cleaned.silver.url, split, p, [*schema.features, schema.label], schema=schema
        )
        frames[p], rows[p] = place(client, frame, place_on) if place_on else spread(client, frame)
    for p, n in rows.items():
        if n == 0:
            raise ValueError(
                f"{cleaned.silver.url}: the {p} slice of the {split.kind} split {split} is empty"
            )
    return frames, rows


def place(client: Any, frame: dd.DataFrame, worker: str) -> tuple[dd.DataFrame, int]:
    """Persist every non-empty partition of ``frame`` on one worker (a search slot); with its row count."""
    where = {"workers": [worker], "allow_other_workers": False}
    placed = [client.compute(part, **where) for part in frame.to_delayed()]
    lengths = client.gather([client.submit(len, f, pure=False, **where) for f in placed])
    kept = [f for f, n in zip(placed, lengths, strict=False) if n] or placed[:1]
    import dask.dataframe as dd

    return dd.from_delayed(kept, meta=frame._meta, verify_meta=False), int(sum(lengths))


def write_model(
    store: Store,
    cleaned: CleanResult,
    params: TrainParams,
    split: SplitParams,
    model: str,
    device: str,
    fitted: Fitted,
    rows: dict[str, int],
    seconds: float,
    search: dict[str, Any] | None = None,
    engine: str = "dask",
) -> TrainResult:
    """Commit a fitted model: the artifact first, ``train.json`` last (it marks the version complete)."""
    schema = silver_schema(store, cleaned.silver.url)
    version = model_version(cleaned, params, split)
    model_url = store.model_url(model, version)
    write_bytes_atomic(store, posixpath.join(model_url, fitted.model_file), fitted.raw)
    result = TrainResult(
        model=model,
        version=version,
        model_url=model_url,
        best_iteration=fitted.best_iteration,
        valid_logloss=fitted.valid_logloss,
        valid_auc=fitted.valid_auc,
        train_rows=rows["train"],
        valid_rows=rows["valid"],
        device=device,
        features=list(schema.features),
        categories=schema.categories,
        seconds=round(seconds, 3),
        xgb_params=fitted.settings,
        split=asdict(split),
        silver_version=cleaned.silver.version,
        model_bytes=len(fitted.raw),
        model_sha256=hashlib.sha256(fitted.raw).hexdigest(),
        family=params.family,
        hyperparameters=params.identity(),
        model_file=fitted.model_file,
        search=search or {},
        label=schema.label,
        task=schema.task,
        classes=list(schema.classes),
        valid_metrics=dict(fitted.valid_metrics),
        engine=engine,
    )
    write_json_atomic(store, posixpath.join(model_url, TRAIN_INFO), asdict(result))
    return result


def committed_model(store: Store, model_url: str) -> TrainResult | None:
    """The finished training at ``model_url``, or None (missing or half-written)."""
    info_url = posixpath.join(model_url, TRAIN_INFO)
    if not exists(store, info_url):
        return None
    info = train_info(store, model_url)
    return info if exists(store, posixpath.join(model_url, info.model_file)) else None


def train(
    store: Store,
    cleaned: CleanResult,
    client: Any,
    params: TrainParams = TrainParams(),
    split: SplitParams | None = None,
    model: str = "flights_late",
    prepare_workers: Callable[[Any], None] | None = None,
) -> TrainResult:
    """Train (or find already trained) ``params`` on the silver data; ``split`` defaults to the spec's.

    ``prepare_workers(client)`` runs just before trees train with ``xgboost.dask``, never when the model
    is found committed: the flow installs its XGBoost log filter there (conveyor.quiet), which imports
    xgboost on every worker (0.8 s of a 4-second rerun when it ran at every stage's start).
    """
    schema = silver_schema(store, cleaned.silver.url)
    check_family(params.family, schema.task)
    split = split or schema.split_params()
    device = resolve_device(client, params.device)
    done = committed_model(store, store.model_url(model, model_version(cleaned, params, split)))
    if done is not None:
        return dataclasses.replace(done, reused=True)
    started = time.perf_counter()
    engine = params.engine(cleaned.silver.rows)
    if engine == "external_memory":
        fitted, rows = fit_external(store, client, cleaned.silver.url, split, schema, params, device)
    else:
        frames, rows = load_frames(store, client, cleaned, split)
        target = Target.of(schema)
        if prepare_workers is not None and params.family != "linear":
            prepare_workers(client)
        fitted = fit(client, frames, schema.features, schema.categories, params, device, target=target)
    seconds = time.perf_counter() - started
    return write_model(store, cleaned, params, split, model, device, fitted, rows, seconds, engine=engine)


def load_raw(raw: bytes, model_file: str = MODEL_FILE) -> Any:
    """A model from its artifact bytes: an ``xgboost.Booster`` (UBJ) or a :class:`LinearModel` (JSON)."""
    import xgboost as xgb

    if model_file == LINEAR_FILE:
        return LinearModel.from_bytes(raw)
    booster = xgb.Booster()
    booster.load_model(bytearray(raw))
    return booster


def load_booster(store: Store, model_url: str) -> Any:
    """The model at ``model_url`` (its artifact named in train.json; model.ubj for older versions)."""
    info_url = posixpath.join(model_url, TRAIN_INFO)
    model_file = (
        read_json(store, info_url).get("model_file", MODEL_FILE) if exists(store, info_url) else MODEL_FILE
    )
    with store.fs.open(store.path(posixpath.join(model_url, model_file)), "rb") as fh:
        raw = fh.read()
    return load_raw(raw, model_file)


def predict_dask(client: Any, model: Any, frame: dd.DataFrame) -> dd.Series:
    """Predictions for an encoded dask frame of the model's features, partition by partition.

    Binary: the positive class's probability (a Series); multiclass: one
    probability column per class code (a DataFrame); regression: the values.
    """
    import xgboost as xgb
    import xgboost.dask  # noqa: F401  (``import xgboost`` does not import the dask module)

    if isinstance(model, xgb.Booster):
        return xgb.dask.inplace_predict(client, model, frame)
    return frame.map_partitions(
        lambda part, m: pd.Series(m.inplace_predict(part), index=part.index, dtype="float64"),
        model,
        meta=pd.Series(dtype="float64"),
    )


def importance(model: Any) -> dict[str, float]:
    """Share of importance per feature: total gain for trees, |standardised weight| for the linear model."""
    raw = (
        model.importance()
        if isinstance(model, LinearModel)
        else model.get_score(importance_type="total_gain")
    )
    total = sum(raw.values()) or 1.0
    return {k: v / total for k, v in sorted(raw.items(), key=lambda kv: -kv[1])}


def train_info(store: Store, model_url: str) -> TrainResult:
    return TrainResult(**read_json(store, posixpath.join(model_url, TRAIN_INFO)))
