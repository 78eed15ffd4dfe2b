"""Load a registered model version for serving or scoring, validated before use.

It lives with the stages, not the registry, because loading needs the
feature encoding and the model formats of ``conveyor.tasks.train``.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from conveyor.store.registry import MODEL_FILE, ModelLoadError, RegistryError, card_url, read_card
from conveyor.store.storage import StorageError, Store


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


def load_model(store: Store, model: str, version: str) -> LoadedModel:
    """Load and validate a registered version; :class:`ModelLoadError` names what is wrong.

    Validation before use is what makes a hot swap safe: the artifact must parse,
    agree with its card's feature list, and predict a probability on a smoke row.
    """
    import numpy as np
    import pandas as pd
    import xgboost as xgb

    from conveyor.tasks.train import encode, load_raw

    base = store.model_url(model, version)
    try:
        card = read_card(store, model, version)
    except (RegistryError, StorageError, OSError) as exc:
        raise ModelLoadError(str(exc)) from None
    features = card.get("features")
    categories = card.get("categories")
    if not isinstance(features, list) or not features or not isinstance(categories, dict):
        raise ModelLoadError(
            f"{card_url(store, model, version)}: field 'features' or 'categories' is missing"
        )
    model_path = posixpath.join(base, card.get("model_file", MODEL_FILE))
    try:
        with store.fs.open(store.path(model_path), "rb") as fh:
            raw = fh.read()
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
    if p.shape != (1,) or not np.isfinite(p).all() or not (0.0 <= p[0] <= 1.0):
        raise ModelLoadError(f"{model_path}: smoke prediction is not a probability ({p!r})")
    threshold = float(card.get("metrics", {}).get("threshold", 0.5))
    return LoadedModel(
        model, version, booster, card, list(features), {k: list(v) for k, v in categories.items()}, threshold
    )
