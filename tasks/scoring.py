"""Scoring with a registered model: validated request rows, partition-parallel batch scoring, live monitoring.

Every path encodes features exactly as training did (``conveyor.tasks.train.encode``
with the categories recorded in the model's card), so a row scored by the
HTTP API, by the batch flow or by evaluate gets the same probability.
"""

from __future__ import annotations

import math
import posixpath
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from conveyor.store.registry import CHAMPION, ModelLoadError, read_alias
from conveyor.store.storage import (
    DatasetRef,
    StorageError,
    Store,
    clear_version,
    code_version,
    commit_dataset,
    committed,
    content_version,
    open_manifest,
    read_dataset,
)
from conveyor.tasks.loading import LoadedModel, load_model

PROBABILITY = "probability"
PREDICTION = "prediction"
MODEL_VERSION = "model_version"
MAX_ERRORS = 20  # a 422 lists at most this many problems


@dataclass(frozen=True)
class FieldError:
    """One problem with one field of one request row (shaped like FastAPI's own 422 detail)."""

    row: int
    field: str
    msg: str
    type: str

    def detail(self) -> dict[str, Any]:
        loc = ["body", "rows"] if self.row < 0 else ["body", "rows", self.row, self.field]
        return {"loc": loc, "msg": self.msg, "type": self.type}


def validate_rows(rows: Any, model: LoadedModel) -> list[FieldError]:
    """Check request rows against the model's feature schema (from its card).

    Every feature must be present; numeric ones take a number or null, categorical
    ones a string or null. A category unseen in training is accepted and scored as
    missing, exactly as training's ``encode`` treats it. Extra fields are ignored.
    """
    errors: list[FieldError] = []
    if not isinstance(rows, list) or not rows:
        return [FieldError(-1, "rows", "must be a non-empty list of records (objects)", "list_type")]
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            errors.append(FieldError(i, "*", "each row must be an object of feature: value", "dict_type"))
            continue
        for name in model.features:
            if name not in row:
                errors.append(FieldError(i, name, f"field '{name}' is required", "missing"))
                continue
            value = row[name]
            if value is None:
                continue
            if name in model.categories:
                if not isinstance(value, str):
                    errors.append(
                        FieldError(
                            i,
                            name,
                            f"field '{name}' must be a string or null, not {type(value).__name__}",
                            "string_type",
                        )
                    )
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                errors.append(
                    FieldError(
                        i,
                        name,
                        f"field '{name}' must be a number or null, not {type(value).__name__}",
                        "float_type",
                    )
                )
            elif not math.isfinite(float(value)):
                errors.append(FieldError(i, name, f"field '{name}' must be a finite number", "finite_number"))
        if len(errors) >= MAX_ERRORS:
            break
    return errors[:MAX_ERRORS]


def encode_known(frame: pd.DataFrame, categories: dict[str, list[str]]) -> pd.DataFrame:
    """``conveyor.tasks.train.encode``: categories unseen in training (a new route, a new carrier) become
    missing."""
    from conveyor.tasks.train import encode

    return encode(frame, categories)


def categorize_known(frame: Any, categories: dict[str, list[str]]) -> Any:
    """:func:`encode_known` for a dask frame, partition by partition."""
    return frame.map_partitions(encode_known, categories, meta=encode_known(frame._meta, categories))


def rows_to_frame(rows: list[dict[str, Any]], model: LoadedModel) -> pd.DataFrame:
    """Validated rows -> the encoded feature frame the booster was trained on."""
    data = {}
    for name in model.features:
        values = [row.get(name) for row in rows]
        if name in model.categories:
            data[name] = pd.array(values, dtype="string")
        else:
            data[name] = np.array([np.nan if v is None else v for v in values], dtype="float32")
    return encode_known(pd.DataFrame(data), model.categories)[model.features]


def predict_frame(model: LoadedModel, frame: pd.DataFrame) -> np.ndarray:
    """Late probabilities for an encoded frame (``inplace_predict`` is thread-safe in XGBoost)."""
    return np.asarray(model.booster.inplace_predict(frame), dtype="float64")


# --- batch scoring on the Dask cluster --------------------------------------------------------


@dataclass(frozen=True)
class ScoringResult:
    predictions: DatasetRef
    model: str
    model_version: str
    input_url: str
    rows: int
    positive_rate: float  # share of rows predicted late at the card's threshold
    reused: bool = False


_BOOSTERS: dict[str, Any] = {}


def _worker_booster(version: str, raw: bytes, model_file: str = "model.ubj") -> Any:
    """One model per model version per worker process, not one per partition."""
    from conveyor.tasks.train import load_raw

    booster = _BOOSTERS.get(version)
    if booster is None:
        booster = load_raw(raw, model_file)
        booster.set_param({"device": "cpu", "nthread": 1})
        _BOOSTERS.clear()
        _BOOSTERS[version] = booster
    return booster


def _score_part(
    part: pd.DataFrame,
    raw: bytes,
    version: str,
    features: list[str],
    categories: dict[str, list[str]],
    threshold: float,
    keep: list[str],
    model_file: str = "model.ubj",
) -> pd.DataFrame:
    out = part[keep].reset_index(drop=True)
    if len(part):
        p = _worker_booster(version, raw, model_file).inplace_predict(
            encode_known(part[features], categories)[features]
        )
        p = np.asarray(p, dtype="float64")
    else:
        p = np.zeros(0, dtype="float64")
    out[PROBABILITY] = p
    out[PREDICTION] = (p >= threshold).astype("int8")
    out[MODEL_VERSION] = pd.Series([version] * len(part), dtype="string")
    return out


def _resolve(store: Store, model: str, version: str | None, alias: str) -> LoadedModel:
    if version is None:
        pointer = read_alias(store, model, alias)
        if pointer is None:
            raise ModelLoadError(f"model {model} has no {alias!r} alias; train and promote one first")
        version = pointer.version
    return load_model(store, model, version)


def score_dataset(
    store: Store,
    client: Any,
    input_url: str,
    model: str,
    version: str | None = None,
    alias: str = CHAMPION,
    keep: list[str] | None = None,
    output_name: str | None = None,
) -> ScoringResult:
    """Score a committed dataset with a model version (default: the alias's), partition-parallel.

    Writes ``datasets/<output_name>/<version>/part-*.parquet`` then its manifest,
    last. The output version is a hash of the input version, model version and
    code, so rerunning finds the work done.
    """
    import dask

    loaded = _resolve(store, model, version, alias)
    manifest = open_manifest(store, input_url)
    missing = [f for f in loaded.features if f not in manifest.schema]
    if missing:
        raise StorageError(f"{input_url}: field(s) {missing} needed by {model} {loaded.version} are missing")
    keep = list(keep if keep is not None else [c for c in ("sched_dep", "is_late") if c in manifest.schema])
    unknown = [c for c in keep if c not in manifest.schema]
    if unknown:
        raise StorageError(f"{input_url}: column(s) {unknown} asked to be kept are not in the dataset")
    name = output_name or f"predictions_{model}"
    out_version = content_version(
        "score", manifest.name, manifest.version, input_url, loaded.version, keep, code_version()
    )
    out_url = store.dataset_url(name, out_version)
    done = committed(store, name, out_version)
    if done is not None:
        return _result(store, done, model, loaded.version, input_url, reused=True)

    model_file = loaded.card.get("model_file", "model.ubj")
    with store.fs.open(
        store.path(posixpath.join(store.model_url(model, loaded.version), model_file)), "rb"
    ) as fh:
        raw = fh.read()
    [raw_future] = client.scatter([raw], broadcast=True, hash=False)
    frame = read_dataset(store, input_url, columns=list(dict.fromkeys([*keep, *loaded.features])))
    meta = _score_part(
        frame._meta, b"", loaded.version, loaded.features, loaded.categories, loaded.threshold, keep
    )
    scored = frame.map_partitions(
        _score_part,
        raw_future,
        loaded.version,
        loaded.features,
        loaded.categories,
        loaded.threshold,
        keep,
        model_file,
        meta=meta,
    )
    clear_version(store, out_url)
    dask.compute(
        scored.to_parquet(
            out_url,
            write_index=False,
            storage_options=store.options,
            compute=False,
            write_metadata_file=False,
            name_function=lambda i: f"part-{i:05d}.parquet",
        )
    )
    lineage = {
        "input": {"name": manifest.name, "version": manifest.version, "url": input_url},
        "model": {"name": model, "version": loaded.version},
    }
    ref = commit_dataset(
        store,
        name,
        out_version,
        out_url,
        lineage,
        extra={"model": model, "model_version": loaded.version, "threshold": loaded.threshold},
    )
    return _result(store, ref, model, loaded.version, input_url, reused=False)


def _result(
    store: Store, ref: DatasetRef, model: str, version: str, input_url: str, reused: bool
) -> ScoringResult:
    rate = (
        float(read_dataset(store, ref.url, columns=[PREDICTION])[PREDICTION].mean().compute())
        if ref.rows
        else 0.0
    )
    return ScoringResult(ref, model, version, input_url, ref.rows, rate, reused)


# --- monitoring: the live champion on recent labelled data ------------------------------------


@dataclass(frozen=True)
class MonitorCheck:
    model: str
    version: str
    data_url: str
    rows: int
    roc_auc: float
    card_roc_auc: float
    max_auc_drop: float
    breached: bool
    reason: str
    metrics: dict[str, float] = field(default_factory=dict)


def monitor_check(
    store: Store,
    client: Any,
    model: str,
    data_url: str | None = None,
    max_auc_drop: float = 0.05,
    min_rows: int = 500,
    alias: str = CHAMPION,
) -> MonitorCheck:
    """Score the live champion on labelled data and compare its ROC AUC with its card's.

    ``data_url`` is a committed dataset with the features and the label; without
    it the holdout of the champion's own silver dataset is replayed (a check that
    the artifact still reproduces its card, e.g. after a storage or code change).
    """
    import dask
    from sklearn.metrics import roc_auc_score

    from conveyor.tasks.clean import LABEL
    from conveyor.tasks.train import SplitParams, load_split, predict_dask

    loaded = _resolve(store, model, None, alias)
    card = loaded.card
    if data_url is None:
        data_url = card["datasets"]["silver_url"]
        split = SplitParams(**card["split"]) if card.get("split") else SplitParams()
        frame = load_split(store, data_url, split, "holdout", [*loaded.features, LABEL])
    else:
        manifest = open_manifest(store, data_url)
        missing = [c for c in [*loaded.features, LABEL] if c not in manifest.schema]
        if missing:
            raise StorageError(
                f"{data_url}: field(s) {missing} needed to monitor {model} {loaded.version} are missing"
            )
        frame = categorize_known(
            read_dataset(store, data_url, columns=[*loaded.features, LABEL]), loaded.categories
        )
    frame = frame[frame[LABEL].notnull()]
    p, y = dask.compute(predict_dask(client, loaded.booster, frame[loaded.features]), frame[LABEL])
    p, y = np.asarray(p, dtype=float), np.asarray(y, dtype=int)
    card_auc = float(card["metrics"]["roc_auc"])
    if len(y) < min_rows or len(np.unique(y)) < 2:
        return MonitorCheck(
            model,
            loaded.version,
            data_url,
            int(len(y)),
            float("nan"),
            card_auc,
            max_auc_drop,
            False,
            f"only {len(y)} labelled rows (need {min_rows} with both classes); no verdict",
        )
    auc = float(roc_auc_score(y, p))
    breached = auc < card_auc - max_auc_drop
    verb = "is below" if breached else "is within"
    reason = (
        f"live ROC AUC {auc:.4f} on {len(y):,} rows {verb} card AUC {card_auc:.4f} - {max_auc_drop} "
        f"for {model} {loaded.version}"
    )
    metrics = {"roc_auc": auc, "positive_rate": float(y.mean()), "mean_probability": float(p.mean())}
    return MonitorCheck(
        model, loaded.version, data_url, int(len(y)), auc, card_auc, max_auc_drop, breached, reason, metrics
    )
