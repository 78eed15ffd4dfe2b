"""Scoring with a registered model: validated request rows, partition-parallel batch scoring, live monitoring.

Every path encodes features exactly as training did (``conveyor.tasks.train.encode``
with the categories recorded in the model's card), so a row scored by the
HTTP API, by the batch flow or by evaluate gets the same prediction. What a
prediction is follows the task in the card's schema: binary, the positive
class's probability and the class at the card's threshold; multiclass, one
probability per class and the most probable class's name; regression, the value.
"""

from __future__ import annotations

import itertools
import math
import operator
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
from conveyor.tasks.spec import SplitParams

PROBABILITY = "probability"  # binary; multiclass writes probability_<class> per class
PREDICTION = "prediction"  # binary: 0/1 at the threshold; multiclass: the class name; regression: the value
MODEL_VERSION = "model_version"
MAX_ERRORS = 20  # a 422 lists at most this many problems


def card_target(card: dict[str, Any]) -> Any:
    """What the model predicts (a ``conveyor.tasks.train.Target``), from its card's schema.

    A card written before pipeline specs has no schema: the flights binary model.
    """
    from conveyor.tasks.train import Target

    schema = card.get("schema") if isinstance(card.get("schema"), dict) else {}
    if "task" not in schema:
        return Target()
    return Target(schema["label"], schema["task"], tuple(schema.get("classes") or ()))


def probability_column(name: str) -> str:
    """The batch output column of one class's probability (multiclass)."""
    return f"{PROBABILITY}_{name}"


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


_NUMBER_TYPES, _TEXT_TYPES = frozenset({int, float, type(None)}), frozenset({str, type(None)})
_EXACT_INT = 2.0**53
FLOAT32_MAX = float(np.finfo(np.float32).max)


def category_codes(categories: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """Each categorical feature's level -> its code (``encode``'s order), built once per loaded model."""
    return {name: {level: float(i) for i, level in enumerate(levels)} for name, levels in categories.items()}


def feature_matrix(rows: Any, model: LoadedModel, codes: dict[str, dict[str, float]]) -> np.ndarray | None:
    """Request rows straight to the float32 matrix ``rows_to_frame`` gives, column by column in numpy.

    None where any value is not plainly valid (a missing field, a wrong type, a number past float32 or
    past float64's exact integers, a string that is not Unicode text): the caller then runs
    :func:`validate_rows` for the 422, or ``rows_to_frame``. Never a different matrix.
    """
    if not isinstance(rows, list) or not rows or not all(type(r) is dict for r in rows):
        return None
    n, features = len(rows), model.features
    out = np.empty((n, len(features)), dtype="float32")
    try:
        if len(features) == 1:
            columns = [tuple(r[features[0]] for r in rows)]
        else:
            getter = operator.itemgetter(*features)
            columns = list(zip(*map(getter, rows), strict=True))  # one tuple per feature
        for j, (name, values) in enumerate(zip(features, columns, strict=True)):
            types = set(map(type, values))
            levels = codes.get(name)
            if levels is not None:
                if not types <= _TEXT_TYPES:
                    return None
                coded = np.fromiter(map(levels.get, values, itertools.repeat(np.nan)), "float64", n)
                if int(np.isnan(coded).sum()) > values.count(None):  # unseen: missing, if it is text at all
                    for v in values:
                        if v is not None and v not in levels:
                            v.encode("utf-8")
                out[:, j] = coded
                continue
            if not types <= _NUMBER_TYPES:
                return None
            column = np.array(values, dtype="float64")  # None -> NaN
            missing = np.isnan(column)
            if int(missing.sum()) != values.count(None) or np.isinf(column).any():
                return None  # a NaN or infinite number (the JSON fallback reads NaN and Infinity)
            present = np.abs(column[~missing])
            if (present > FLOAT32_MAX).any() or (int in types and (present >= _EXACT_INT).any()):
                return None
            out[:, j] = column
    except (KeyError, UnicodeEncodeError, OverflowError):  # OverflowError: an integer past float64
        return None
    return out


def predict_matrix(model: LoadedModel, matrix: np.ndarray) -> np.ndarray:
    """:func:`predict_frame` for an encoded float32 matrix in the model's feature order."""
    from conveyor.tasks.families import LinearModel

    data = pd.DataFrame(matrix, columns=model.features) if isinstance(model.booster, LinearModel) else matrix
    values = np.asarray(model.booster.inplace_predict(data), dtype="float64")
    target = card_target(model.card)
    return (
        values.reshape(len(matrix), target.num_class) if target.task == "multiclass" else values.reshape(-1)
    )


def predict_frame(model: LoadedModel, frame: pd.DataFrame) -> np.ndarray:
    """Predictions for an encoded frame (``inplace_predict`` is thread-safe in XGBoost).

    Binary: the positive class's probability per row, shape (n,); multiclass:
    one probability per class, shape (n, classes); regression: the value, (n,).
    """
    values = np.asarray(model.booster.inplace_predict(frame), dtype="float64")
    target = card_target(model.card)
    return values.reshape(len(frame), target.num_class) if target.task == "multiclass" else values.reshape(-1)


def prediction_payload(model: LoadedModel, values: np.ndarray) -> dict[str, Any]:
    """The response body fields for :func:`predict_frame`'s output, per task.

    Binary: ``probabilities`` and ``predictions`` (0/1 at ``threshold``);
    multiclass: ``probabilities`` (one object of class: probability per row)
    and ``predictions`` (class names); regression: ``predictions`` (values).
    """
    target = card_target(model.card)
    if target.task == "binary":
        return {
            "task": "binary",
            "threshold": model.threshold,
            "probabilities": values.tolist(),
            "predictions": (values >= model.threshold).astype(int).tolist(),
        }
    if target.task == "multiclass":
        classes = list(target.classes)
        return {
            "task": "multiclass",
            "classes": classes,
            "probabilities": [dict(zip(classes, map(float, row), strict=True)) for row in values],
            "predictions": [classes[i] for i in values.argmax(axis=1)] if len(values) else [],
        }
    return {"task": "regression", "predictions": values.tolist()}


# --- batch scoring on the Dask cluster --------------------------------------------------------


@dataclass(frozen=True)
class ScoringResult:
    predictions: DatasetRef
    model: str
    model_version: str
    input_url: str
    rows: int
    positive_rate: float  # binary: share of rows predicted positive at the card's threshold; else NaN
    reused: bool = False
    task: str = "binary"
    # binary: positive rate; multiclass: class shares; regression: mean and std of the predictions
    summary: dict[str, float] = field(default_factory=dict)
    # Raw rows only (conveyor.tasks.inference.score_raw): the rows that could not be scored, and why.
    quarantined: int = 0
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    quarantine_url: str = ""
    exported_to: str = ""

    def describe(self) -> str:
        """The predictions in one phrase, per task (for logs and artifacts)."""
        if self.task == "binary":
            return f"{self.positive_rate:.1%} predicted positive"
        if self.task == "multiclass":
            return "predicted " + ", ".join(f"{c} {v:.1%}" for c, v in self.summary.items())
        mean, std = self.summary.get("mean", math.nan), self.summary.get("std", math.nan)
        return f"mean prediction {mean:.4g} (std {std:.4g})"


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
    target: Any = None,
) -> pd.DataFrame:
    from conveyor.tasks.train import Target

    target = target or Target()
    out = part[keep].reset_index(drop=True)
    width = target.num_class if target.task == "multiclass" else 0
    if len(part):
        p = _worker_booster(version, raw, model_file).inplace_predict(
            encode_known(part[features], categories)[features]
        )
        p = np.asarray(p, dtype="float64")
    else:
        p = np.zeros((0, width) if width else 0, dtype="float64")
    if target.task == "binary":
        out[PROBABILITY] = p
        out[PREDICTION] = (p >= threshold).astype("int8")
    elif target.task == "multiclass":
        p = p.reshape(len(part), width)
        for j, name in enumerate(target.classes):
            out[probability_column(name)] = p[:, j]
        names = np.asarray(target.classes, dtype=object)
        out[PREDICTION] = pd.array(names[p.argmax(axis=1)] if len(p) else [], dtype="string")
    else:
        out[PREDICTION] = p.reshape(-1)
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
    from conveyor.tasks.train import LEGACY_SCHEMA

    target = card_target(loaded.card)
    schema = loaded.card.get("schema") or {}
    default_keep = [schema.get("time_key", LEGACY_SCHEMA["time_key"]), target.label]
    keep = list(
        keep if keep is not None else [c for c in dict.fromkeys(default_keep) if c in manifest.schema]
    )
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
        return _result(store, done, model, loaded.version, input_url, reused=True, target=target)

    model_file = loaded.card.get("model_file", "model.ubj")
    with store.fs.open(
        store.path(posixpath.join(store.model_url(model, loaded.version), model_file)), "rb"
    ) as fh:
        raw = fh.read()
    [raw_future] = client.scatter([raw], broadcast=True, hash=False)
    frame = read_dataset(store, input_url, columns=list(dict.fromkeys([*keep, *loaded.features])))
    meta = _score_part(
        frame._meta,
        b"",
        loaded.version,
        loaded.features,
        loaded.categories,
        loaded.threshold,
        keep,
        target=target,
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
        target,
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
        extra=predictions_extra(model, loaded, target),
    )
    return _result(store, ref, model, loaded.version, input_url, reused=False, target=target)


def predictions_extra(model: str, loaded: LoadedModel, target: Any) -> dict[str, Any]:
    """What a predictions manifest says about the model that made it (batch and raw scoring alike)."""
    return {
        "model": model,
        "model_version": loaded.version,
        "threshold": loaded.threshold,
        "task": target.task,
        "classes": list(target.classes),
    }


def _result(
    store: Store,
    ref: DatasetRef,
    model: str,
    version: str,
    input_url: str,
    reused: bool,
    target: Any = None,
) -> ScoringResult:
    from conveyor.tasks.train import Target

    target = target or Target()
    predicted = read_dataset(store, ref.url, columns=[PREDICTION])[PREDICTION] if ref.rows else None
    summary: dict[str, float] = {}
    rate = math.nan
    if target.task == "binary":
        rate = float(predicted.mean().compute()) if predicted is not None else 0.0
        summary = {"positive_rate": rate}
    elif target.task == "multiclass":
        counts = predicted.value_counts().compute() if predicted is not None else pd.Series(dtype="int64")
        summary = {c: float(counts.get(c, 0) / max(ref.rows, 1)) for c in target.classes}
    elif predicted is not None:
        import dask

        mean, std = dask.compute(predicted.mean(), predicted.std())
        summary = {"mean": float(mean), "std": float(std)}
    return ScoringResult(ref, model, version, input_url, ref.rows, rate, reused, target.task, summary)


# --- monitoring: the live champion on recent labelled data ------------------------------------


@dataclass(frozen=True)
class MonitorCheck:
    """The live champion's gate metric on labelled data against the value on its card."""

    model: str
    version: str
    data_url: str
    rows: int
    value: float  # the metric on the live data (NaN: no verdict)
    card_value: float  # the metric on the card (the holdout at training time)
    max_drop: (
        float  # allowed worsening: absolute for scores in [0, 1], a share of the card's value for errors
    )
    breached: bool
    reason: str
    metrics: dict[str, float] = field(default_factory=dict)
    metric: str = "roc_auc"

    @property
    def roc_auc(self) -> float:
        return self.value if self.metric == "roc_auc" else math.nan

    @property
    def card_roc_auc(self) -> float:
        return self.card_value if self.metric == "roc_auc" else math.nan

    @property
    def max_auc_drop(self) -> float:
        return self.max_drop


RELATIVE_DROP = frozenset({"log_loss", "brier", "rmse", "mae"})  # unbounded errors: the drop is relative


def worsening(metric: str, value: float, card_value: float) -> float:
    """How much worse the live value is than the card's: absolute for bounded scores, relative for errors."""
    from conveyor.tasks.evaluate import improvement

    worse = -improvement(metric, value, card_value)
    return worse / abs(card_value) if metric in RELATIVE_DROP and card_value else worse


def monitor_check(
    store: Store,
    client: Any,
    model: str,
    data_url: str | None = None,
    max_auc_drop: float = 0.05,
    min_rows: int = 500,
    alias: str = CHAMPION,
) -> MonitorCheck:
    """Score the live champion on labelled data and compare its gate metric with its card's.

    The metric is the card's gate metric (ROC AUC for a binary model without a
    schema). ``max_auc_drop`` is the allowed worsening: absolute for scores in
    [0, 1] (AUC, F1, accuracy, R²), a share of the card's value for errors
    (RMSE, MAE, log loss). ``data_url`` is a committed dataset with the
    features and the label; without it the holdout of the champion's own
    silver dataset is replayed (a check that the artifact still reproduces its
    card, e.g. after a storage or code change).
    """
    import dask

    from conveyor.tasks.evaluate import as_array, metric_names, score_target
    from conveyor.tasks.train import load_split, predict_dask

    loaded = _resolve(store, model, None, alias)
    card = loaded.card
    target = card_target(card)
    label = target.label
    schema = card.get("schema") or {}
    metric = schema.get("gate_metric", "roc_auc")
    if metric not in metric_names(target.task) or metric not in card.get("metrics", {}):
        raise ModelLoadError(f"{model} {loaded.version}: its card has no {target.task} metric {metric!r}")
    if data_url is None:
        data_url = card["datasets"]["silver_url"]
        split = SplitParams(**card["split"]) if card.get("split") else None
        frame = load_split(store, data_url, split, "holdout", [*loaded.features, label])
    else:
        manifest = open_manifest(store, data_url)
        missing = [c for c in [*loaded.features, label] if c not in manifest.schema]
        if missing:
            raise StorageError(
                f"{data_url}: field(s) {missing} needed to monitor {model} {loaded.version} are missing"
            )
        frame = categorize_known(
            read_dataset(store, data_url, columns=[*loaded.features, label]), loaded.categories
        )
    frame = frame[frame[label].notnull()]
    p, y = dask.compute(predict_dask(client, loaded.booster, frame[loaded.features]), frame[label])
    p = as_array(p, target)
    y = np.asarray(y, dtype="float64" if target.task == "regression" else int)
    card_value = float(card["metrics"][metric])
    classes_seen = len(np.unique(y)) if len(y) else 0
    if len(y) < min_rows or (target.task != "regression" and classes_seen < 2):
        return MonitorCheck(
            model,
            loaded.version,
            data_url,
            int(len(y)),
            math.nan,
            card_value,
            max_auc_drop,
            False,
            f"only {len(y)} labelled rows (need {min_rows}"
            + (" with at least two classes" if target.task != "regression" else "")
            + "); no verdict",
            metric=metric,
        )
    scored = score_target(target, y, p, threshold=loaded.threshold)
    value = float(getattr(scored, metric))
    worse = worsening(metric, value, card_value)
    breached = worse > max_auc_drop
    allowed = f"{max_auc_drop:.0%} worse" if metric in RELATIVE_DROP else f"{max_auc_drop} worse"
    reason = (
        f"live {metric} {value:.4f} on {len(y):,} rows is {'more' if breached else 'no more'} than {allowed} "
        f"than the card's {card_value:.4f} for {model} {loaded.version}"
    )
    metrics = {metric: value}
    if target.task == "binary":
        metrics |= {"positive_rate": float(y.mean()), "mean_probability": float(p.mean())}
    elif target.task == "regression":
        metrics |= {"mean_label": float(y.mean()), "mean_prediction": float(p.mean())}
    return MonitorCheck(
        model,
        loaded.version,
        data_url,
        int(len(y)),
        value,
        card_value,
        max_auc_drop,
        breached,
        reason,
        metrics,
        metric,
    )
