"""Load a registered model version for serving or scoring, validated before use.

It lives with the stages, not the registry, because loading needs the
feature encoding and the model formats of ``conveyor.tasks.train``.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from conveyor.store.registry import CARD, MODEL_FILE, ModelLoadError, RegistryError, card_url, read_card
from conveyor.store.storage import (
    StorageError,
    Store,
    UnsafeKeyError,
    check_key,
    confined_join,
    exists,
    read_json,
)

TRAIN_INFO = "train.json"  # conveyor.tasks.train.TRAIN_INFO, written beside the artifact
SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class LoadedModel:
    """A booster ready to predict, with the schema it was trained on (from its card)."""

    model: str
    version: str
    booster: Any  # xgboost.Booster, or conveyor.tasks.families.LinearModel (same inplace_predict)
    card: dict[str, Any]
    features: list[str]
    categories: dict[str, list[str]]
    threshold: float
    loaded_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    model_file: str = MODEL_FILE
    raw: bytes = field(default=b"", repr=False)  # the verified artifact: reuse it, never re-read the file


def _checked_model_file(store: Store, model: str, version: str, card: dict[str, Any]) -> tuple[str, str]:
    """(path of the artifact, its recorded sha256): the name confined to the version folder, the checksum
    from the card or, for cards that do not carry it, from ``train.json`` written beside the artifact."""
    base = store.model_url(model, version)
    info_url = posixpath.join(base, TRAIN_INFO)
    try:
        info = read_json(store, info_url) if exists(store, info_url) else {}
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{info_url}: unreadable ({type(exc).__name__})") from None
    if not isinstance(info, dict):
        raise ModelLoadError(f"{info_url}: not a JSON object")
    model_file = card.get("model_file") or info.get("model_file") or MODEL_FILE
    try:
        model_path = confined_join(base, model_file, card_url(store, model, version))
    except UnsafeKeyError as exc:
        raise ModelLoadError(str(exc)) from None
    expected = card.get("model_sha256")
    if not expected and info.get("model_file", MODEL_FILE) == model_file:
        expected = info.get("model_sha256")
    if not isinstance(expected, str) or not SHA256.match(expected):
        raise ModelLoadError(
            f"{model_path}: no model_sha256 in {CARD} or {TRAIN_INFO}; an unverifiable model is not loaded"
        )
    return model_path, expected


def _threshold(card: dict[str, Any], where: str) -> float:
    metrics = card.get("metrics", {})
    raw = metrics.get("threshold", 0.5) if isinstance(metrics, dict) else None
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not 0.0 <= raw <= 1.0:
        raise ModelLoadError(
            f"{where}: field 'metrics.threshold' must be a number in [0, 1], not {repr(raw)[:40]}"
        )
    return float(raw)


def load_model(store: Store, model: str, version: str) -> LoadedModel:
    """Load and validate a registered version; :class:`ModelLoadError` names what is wrong.

    Validation before use is what makes a hot swap safe: the artifact must match
    its recorded sha256 (checked on every load: a swapped or truncated file is
    never served), parse, agree with its card's feature list, and predict a
    probability on a smoke row. Stored names (``model_file``) stay inside the
    version folder.
    """
    import numpy as np
    import pandas as pd
    import xgboost as xgb

    from conveyor.tasks.train import encode, load_raw

    for what, name in (("model", model), ("version", version)):
        if not isinstance(name, str) or "/" in name:
            raise ModelLoadError(f"{what} {name!r} is not a plain name")
        try:
            check_key(name, what)
        except UnsafeKeyError as exc:
            raise ModelLoadError(str(exc)) from None
    where = card_url(store, model, version)
    try:
        card = read_card(store, model, version)
    except (RegistryError, StorageError, OSError, ValueError) as exc:  # ValueError: not UTF-8, not JSON
        message = str(exc) if where in str(exc) else f"{where}: {type(exc).__name__}"
        raise ModelLoadError(message) from None
    if not isinstance(card, dict):
        raise ModelLoadError(f"{where}: not a JSON object")
    features = card.get("features")
    categories = card.get("categories")
    if (
        not isinstance(features, list)
        or not features
        or not all(isinstance(f, str) for f in features)
        or not isinstance(categories, dict)
        or not all(isinstance(v, list) for v in categories.values())
    ):
        raise ModelLoadError(f"{where}: field 'features' or 'categories' is missing or malformed")
    threshold = _threshold(card, where)
    model_path, expected_sha = _checked_model_file(store, model, version, card)
    try:
        with store.fs.open(store.path(model_path), "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise ModelLoadError(f"{model_path}: cannot be read ({type(exc).__name__})") from None
    if hashlib.sha256(raw).hexdigest() != expected_sha:
        raise ModelLoadError(f"{model_path}: sha256 does not match the recorded model_sha256; not loaded")
    try:
        booster = load_raw(raw, posixpath.basename(model_path))
    except (OSError, ValueError, TypeError, xgb.core.XGBoostError) as exc:
        raise ModelLoadError(
            f"{model_path}: cannot be loaded ({type(exc).__name__}: {str(exc).splitlines()[0]})"
        ) from None
    booster.set_param({"device": "cpu", "nthread": 1})
    if booster.num_features() != len(features):
        raise ModelLoadError(
            f"{model_path}: has {booster.num_features()} features, its card lists {len(features)}"
        )
    if booster.feature_names is not None and list(booster.feature_names) != features:
        raise ModelLoadError(f"{model_path}: feature names differ from the card's 'features'")
    smoke = encode(
        pd.DataFrame(
            {f: pd.Series([None], dtype="float32" if f not in categories else "string") for f in features}
        ),
        categories,
    )
    try:
        p = np.asarray(booster.inplace_predict(smoke[features]), dtype=float)
    except xgb.core.XGBoostError as exc:
        raise ModelLoadError(f"{model_path}: smoke prediction failed ({str(exc).splitlines()[0]})") from None
    schema = card.get("schema") if isinstance(card.get("schema"), dict) else {}
    task, n_classes = schema.get("task", "binary"), len(schema.get("classes") or ())
    shape = (1, n_classes) if task == "multiclass" else (1,)
    probability = task != "regression"  # a regression predicts any finite value
    if p.shape != shape or not np.isfinite(p).all() or (probability and not ((p >= 0) & (p <= 1)).all()):
        what = "a probability" if probability else "a finite value"
        raise ModelLoadError(f"{model_path}: smoke prediction is not {what} of shape {shape} ({p!r})")
    return LoadedModel(
        model,
        version,
        booster,
        card,
        list(features),
        {k: list(v) for k, v in categories.items()},
        threshold,
        model_file=posixpath.basename(model_path),
        raw=raw,
    )
