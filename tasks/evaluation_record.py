"""A committed evaluation: the evaluate stage's result kept beside the model it scored.

A rerun that changes nothing the evaluation read (the silver version, the model
version, the split, the champion it was compared with, the evaluation code)
reads this record instead of scoring the holdout again: a reused stage costs
what reading its record costs. A record that is missing, unreadable or written
by other code is ignored and the evaluation runs.
"""

from __future__ import annotations

import dataclasses
import logging
import posixpath
from typing import Any

from conveyor.store.storage import (
    Store,
    code_version,
    content_version,
    exists,
    read_json,
    write_json_atomic,
)
from conveyor.tasks.clean import CleanResult
from conveyor.tasks.evaluate import (
    ChampionScore,
    EvaluationResult,
    Metrics,
    MulticlassMetrics,
    RegressionMetrics,
)
from conveyor.tasks.spec import SplitParams
from conveyor.tasks.train import TrainResult

logger = logging.getLogger(__name__)

METRICS = {"binary": Metrics, "multiclass": MulticlassMetrics, "regression": RegressionMetrics}
FORMAT = 1


def record_url(
    cleaned: CleanResult, trained: TrainResult, split: SplitParams, champion_version: str | None
) -> str:
    """Where the evaluation of ``trained`` against this holdout and champion is kept."""
    against = champion_version if champion_version != trained.version else None
    key = content_version(
        "evaluate",
        cleaned.silver.version,
        trained.version,
        dataclasses.asdict(split),
        against,
        code_version("evaluate"),
    )
    return posixpath.join(trained.model_url, "evaluations", f"{key}.json")


def to_json(result: EvaluationResult) -> dict[str, Any]:
    return {"format": FORMAT, "evaluation": dataclasses.asdict(result) | {"reused": False}}


def from_json(data: Any) -> EvaluationResult:
    """The result a record holds; ``ValueError``/``TypeError``/``KeyError`` when it is not one."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError("not an evaluation record of this format")
    fields = dict(data["evaluation"])
    metrics = METRICS[fields["task"]]
    fields["metrics"] = metrics(**fields["metrics"])
    fields["baseline"] = metrics(**fields["baseline"])
    champion = fields.get("champion")
    if champion is not None:
        scored = champion.get("metrics")
        fields["champion"] = ChampionScore(
            version=champion["version"],
            metrics=metrics(**scored) if scored is not None else None,
            note=champion.get("note", ""),
        )
    return EvaluationResult(**fields)


def load(store: Store, url: str) -> EvaluationResult | None:
    """The committed evaluation at ``url``, or None (absent, or not readable as one: it is redone)."""
    try:
        if not exists(store, url):
            return None
        return dataclasses.replace(from_json(read_json(store, url)), reused=True)
    except Exception as exc:  # a damaged record costs one evaluation, never a run
        logger.warning(
            "ignoring the evaluation record %s (%s: %s); evaluating again", url, type(exc).__name__, exc
        )
        return None


def save(store: Store, url: str, result: EvaluationResult) -> None:
    write_json_atomic(store, url, to_json(result))
