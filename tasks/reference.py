"""The operator's reference holdout: a committed dataset version the gate also judges on.

A run's own holdout comes from the data the run was given, and whoever can
submit a run (the UI form, a ``conveyor.dataset.landed`` event) chooses that
data. So an operator pins, per model, one committed silver version
(``CONVEYOR_REFERENCE_HOLDOUTS``); before a challenger replaces the champion
both are scored on that version's holdout slice, and a challenger worse there
(beyond the gate's tolerance) is refused whatever its own holdout says. A
pinned version that is missing or unreadable refuses every promotion: the
gate fails closed.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np

from conveyor.store.storage import (
    StorageError,
    Store,
    check_key,
    exists,
    read_dataset_pandas,
    read_json,
)
from conveyor.tasks.evaluate import as_array, metric_names, score_target
from conveyor.tasks.train import Target, categorize, load_booster, silver_schema, split_mask, train_info

ENV = "CONVEYOR_REFERENCE_HOLDOUTS"


class ReferenceError(ValueError):
    """The operator's reference setting is malformed (a configuration error, named)."""


def pinned(model: str) -> str | None:
    """The ``dataset/version`` the operator pinned as ``model``'s reference holdout, or None."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    try:
        table = json.loads(raw)
    except ValueError:
        raise ReferenceError(
            f'{ENV} must be a JSON object {{"<model>": "<dataset>/<version>"}}, not {raw[:80]!r}'
        ) from None
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
        raise ReferenceError(f'{ENV} must map model names to "<dataset>/<version>" strings')
    ref = table.get(model)
    if ref is None:
        return None
    parts = ref.strip("/").split("/")
    if len(parts) != 2:
        raise ReferenceError(f'{ENV}[{model!r}] must be "<dataset>/<version>", not {ref!r}')
    for part in parts:
        try:
            check_key(part, ENV)
        except StorageError as exc:
            raise ReferenceError(str(exc)) from None
    return "/".join(parts)


@dataclass(frozen=True)
class ReferenceScores:
    """The gate metric of the challenger and the champion on the pinned reference holdout."""

    dataset: str  # dataset/version
    metric: str
    rows: int
    challenger: float | None
    champion: float | None
    note: str = ""  # why a score is missing (then the gate refuses)


def _model_score(
    store: Store, model_url: str, frame: Any, label: str, metric: str, target: Target
) -> tuple[float, int]:
    info = train_info(store, model_url)
    missing = [c for c in info.features if c not in frame.columns]
    if missing:
        raise ValueError(f"the reference lacks the model's features {missing}")
    booster = load_booster(store, model_url)
    encoded = categorize(frame[list(info.features)].copy(), info.categories, list(info.features))
    p = as_array(booster.inplace_predict(encoded[list(info.features)]), target)
    card_url = posixpath.join(model_url, "card.json")
    card = read_json(store, card_url) if exists(store, card_url) else {}
    threshold = (card.get("metrics") or {}).get("threshold") if target.task == "binary" else None
    y = frame[label].to_numpy(dtype=int if target.task != "regression" else "float64")
    metrics = score_target(target, np.asarray(y), p, threshold=threshold if threshold is not None else 0.5)
    return float(getattr(metrics, metric)), len(y)


def score_reference(
    store: Store, reference: str, metric: str, challenger_url: str, champion_url: str
) -> ReferenceScores:
    """Both models' ``metric`` on the holdout slice of the pinned ``dataset/version`` (by its own split)."""
    name, version = reference.split("/")
    url = store.dataset_url(name, version)
    try:
        schema = silver_schema(store, url)
        if metric not in metric_names(schema.task):
            raise ValueError(f"{metric} is not a {schema.task} metric")
        split = schema.split_params()
        columns = list(dict.fromkeys([*schema.features, schema.label, split.time_key]))
        if split.kind == "ratio":
            from conveyor.tasks.spec import FOLD

            columns.append(FOLD)
        frame = read_dataset_pandas(store, url, [c for c in columns if c])
        frame = frame[np.asarray(split_mask(frame, split, "holdout"))].reset_index(drop=True)
        if frame.empty:
            raise ValueError("its holdout slice is empty")
        target = Target.of(schema)
    except Exception as exc:
        note = f"reference holdout {reference} is unreadable ({type(exc).__name__}: {exc})"
        return ReferenceScores(reference, metric, 0, None, None, note)
    scores: dict[str, float | None] = {}
    notes, rows = [], len(frame)
    for who, model_url in (("challenger", challenger_url), ("champion", champion_url)):
        try:
            scores[who], rows = _model_score(store, model_url, frame, schema.label, metric, target)
        except Exception as exc:
            scores[who] = None
            notes.append(f"the {who} could not be scored on {reference} ({type(exc).__name__}: {exc})")
    return ReferenceScores(
        reference, metric, rows, scores["challenger"], scores["champion"], "; ".join(notes)
    )
