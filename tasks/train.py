"""Train: XGBoost on the Dask cluster (``xgboost.dask``), time-based split, early stopping.

The model is written as UBJ (never pickle) under ``models/<model>/<version>/``
with ``train.json`` beside it; the version is not trusted (not in the
registry) until deploy writes its ``card.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import posixpath
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import dask.dataframe as dd
import numpy as np
import pandas as pd
import xgboost as xgb
import xgboost.dask  # noqa: F401  (``import xgboost`` does not import the dask module)

from tasks.clean import CATEGORICAL, LABEL, TIME_KEY, CleanResult
from tasks.storage import Store, code_version, content_version, exists, open_manifest, read_dataset, read_json, write_bytes_atomic, write_json_atomic

MODEL_FILE = "model.ubj"
TRAIN_INFO = "train.json"


@dataclass(frozen=True)
class SplitParams:
    """Time-based split: train on earlier months, pick the stopping round on the next, test on the rest."""

    train_end: str = "2013-09-01"  # train: sched_dep < train_end
    valid_end: str = "2013-10-01"  # validation: train_end <= sched_dep < valid_end; holdout: after


@dataclass(frozen=True)
class TrainParams:
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


@dataclass(frozen=True)
class TrainResult:
    model: str
    version: str
    model_url: str  # the folder of this model version
    best_iteration: int
    valid_logloss: float
    valid_auc: float
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


def gpu_count() -> int:
    """CUDA devices visible to this process (0 without a driver or NVML)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no library, no device: a CPU worker
        return 0


def workers_have_gpus(client: Any) -> bool:
    counts = client.run(gpu_count)
    return bool(counts) and all(c > 0 for c in counts.values())


def encode(frame: pd.DataFrame, categories: dict[str, list[str]]) -> pd.DataFrame:
    """Replace categoricals by their code in the manifest's category list (unknown or missing -> NaN).

    Integer codes with ``feature_types="c"`` keep XGBoost's native categorical
    splits without asking every Dask worker to infer categories from its own
    partitions (which fails on a worker that holds none).
    """
    out = frame.copy()
    for col in CATEGORICAL:
        if col in out.columns:
            values = out[col].astype("string")
            values = values.where(values.isin(categories[col]))  # unseen -> NA, as before
            codes = pd.Categorical(values, categories=categories[col]).codes
            out[col] = np.where(codes < 0, np.nan, codes).astype("float32")
    return out


def categorize(frame: dd.DataFrame | pd.DataFrame, categories: dict[str, list[str]]):
    """Encode categoricals of a dask or pandas frame with the recorded categories."""
    if isinstance(frame, pd.DataFrame):
        return encode(frame, categories)
    return frame.map_partitions(encode, categories, meta=encode(frame._meta, categories))


def spread(client: Any, frame: dd.DataFrame) -> dd.DataFrame:
    """Persist ``frame`` with non-empty partitions placed round-robin on every worker.

    A time slice usually sits in a few input partitions; XGBoost trains on the
    partitions where they lie, so without this a worker can end up with none.
    """
    frame = frame.persist()
    lengths = frame.map_partitions(len).compute().tolist()
    non_empty = [i for i, n in enumerate(lengths) if n]
    if not non_empty:
        return frame
    frame = frame.partitions[non_empty]
    workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
    if len(non_empty) < len(workers) and sum(lengths) >= len(workers):
        frame = frame.repartition(npartitions=len(workers))
    placed = [client.compute(part, workers=[workers[i % len(workers)]]) for i, part in enumerate(frame.to_delayed())]
    return dd.from_delayed(placed, meta=frame._meta, verify_meta=False)


def feature_types(features: list[str]) -> list[str]:
    return ["c" if f in CATEGORICAL else "q" for f in features]


def load_split(store: Store, silver_url: str, split: SplitParams, part: Literal["train", "valid", "holdout"],
               columns: list[str]) -> dd.DataFrame:
    manifest = open_manifest(store, silver_url)
    frame = read_dataset(store, silver_url, columns=[TIME_KEY, *columns])
    t_end = pd.Timestamp(split.train_end, tz="UTC")
    v_end = pd.Timestamp(split.valid_end, tz="UTC")
    when = frame[TIME_KEY]
    mask = {"train": when < t_end, "valid": (when >= t_end) & (when < v_end), "holdout": when >= v_end}[part]
    return categorize(frame[mask][columns], manifest.extra["categories"])


def xgb_params(params: TrainParams, device: str) -> dict[str, Any]:
    return {
        "objective": "binary:logistic",
        "eval_metric": ["logloss", "auc"],
        "tree_method": "hist",
        "device": device,
        "learning_rate": params.learning_rate,
        "max_depth": params.max_depth,
        "min_child_weight": params.min_child_weight,
        "subsample": params.subsample,
        "colsample_bytree": params.colsample_bytree,
        "max_cat_to_onehot": params.max_cat_to_onehot,
        "seed": params.seed,
    }


def train(store: Store, cleaned: CleanResult, client: Any, params: TrainParams = TrainParams(),
          split: SplitParams = SplitParams(), model: str = "flights_late") -> TrainResult:
    device = params.device
    if device == "auto":
        device = "cuda" if workers_have_gpus(client) else "cpu"
    # The device is not part of the version: the same data and params give the same model family.
    version = content_version("train", cleaned.silver.version, asdict(params) | {"device": None}, asdict(split), code_version("train"))
    model_url = store.model_url(model, version)
    info_url = posixpath.join(model_url, TRAIN_INFO)
    if exists(store, info_url) and exists(store, posixpath.join(model_url, MODEL_FILE)):
        return dataclasses.replace(train_info(store, model_url), reused=True)

    started = time.perf_counter()
    features = cleaned.features
    frames = {p: spread(client, load_split(store, cleaned.silver.url, split, p, [*features, LABEL])) for p in ("train", "valid")}
    rows = {p: int(f.shape[0].compute()) for p, f in frames.items()}
    for p, n in rows.items():
        if n == 0:
            raise ValueError(f"{cleaned.silver.url}: the {p} slice of the time split {split} is empty")
    types = feature_types(features)
    dtrain = xgb.dask.DaskQuantileDMatrix(client, frames["train"][features], frames["train"][LABEL],
                                          feature_types=types, enable_categorical=True)
    dvalid = xgb.dask.DaskQuantileDMatrix(client, frames["valid"][features], frames["valid"][LABEL],
                                          feature_types=types, enable_categorical=True, ref=dtrain)
    booster_params = xgb_params(params, device)
    output = xgb.dask.train(
        client,
        booster_params,
        dtrain,
        num_boost_round=params.num_boost_round,
        evals=[(dvalid, "valid")],
        early_stopping_rounds=params.early_stopping_rounds,
        verbose_eval=False,
    )
    booster: xgb.Booster = output["booster"]
    history = output["history"]["valid"]
    best = int(booster.best_iteration)
    raw = bytes(booster.save_raw(raw_format="ubj"))
    write_bytes_atomic(store, posixpath.join(model_url, MODEL_FILE), raw)
    result = TrainResult(
        model=model,
        version=version,
        model_url=model_url,
        best_iteration=best,
        valid_logloss=float(history["logloss"][best]),
        valid_auc=float(history["auc"][best]),
        train_rows=rows["train"],
        valid_rows=rows["valid"],
        device=device,
        features=list(features),
        categories=cleaned.categories,
        seconds=round(time.perf_counter() - started, 3),
        xgb_params=booster_params,
        split=asdict(split),
        silver_version=cleaned.silver.version,
        model_bytes=len(raw),
        model_sha256=hashlib.sha256(raw).hexdigest(),
    )
    write_json_atomic(store, info_url, asdict(result))  # last: marks the training as finished
    return result


def load_booster(store: Store, model_url: str) -> xgb.Booster:
    with store.fs.open(store.path(posixpath.join(model_url, MODEL_FILE)), "rb") as fh:
        raw = fh.read()
    booster = xgb.Booster()
    booster.load_model(bytearray(raw))
    return booster


def train_info(store: Store, model_url: str) -> TrainResult:
    return TrainResult(**read_json(store, posixpath.join(model_url, TRAIN_INFO)))
