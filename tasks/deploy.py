"""Deploy: register a model version and promote it to champion only if it passes the gate.

Registry layout under the store root::

    models/<model>/<version>/model.ubj       the booster (UBJ, never pickle)
    models/<model>/<version>/card.json       written last: the version is registered
    models/<model>/aliases/<alias>.json      pointer, replaced atomically
    models/<model>/aliases/history/<alias>/  one event file per change (append-only)
"""

from __future__ import annotations

import getpass
import platform
import posixpath
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from tasks.clean import CleanResult
from tasks.evaluate import EvaluationResult
from tasks.storage import Store, code_version, exists, read_json, write_json_atomic
from tasks.train import TrainResult

CARD = "card.json"
CHAMPION = "champion"


@dataclass(frozen=True)
class GateParams:
    metric: str = "roc_auc"
    tolerance: float = 0.0  # challenger may be this much below the champion and still win
    must_beat_baseline: bool = True


@dataclass(frozen=True)
class DeployResult:
    model: str
    version: str
    card_url: str
    promoted: bool
    champion_before: str | None
    champion_after: str | None
    reason: str


def alias_url(store: Store, model: str, alias: str) -> str:
    return store.url("models", model, "aliases", f"{alias}.json")


def get_alias(store: Store, model: str, alias: str = CHAMPION) -> dict[str, Any] | None:
    url = alias_url(store, model, alias)
    return read_json(store, url) if exists(store, url) else None


def set_alias(store: Store, model: str, alias: str, version: str, reason: str) -> dict[str, Any]:
    """Point ``alias`` at a registered version: history event first, then the pointer swap."""
    if not exists(store, posixpath.join(store.model_url(model, version), CARD)):
        raise ValueError(f"model {model} version {version} is not registered (no {CARD})")
    previous = get_alias(store, model, alias)
    now = datetime.now(timezone.utc)
    pointer = {
        "model": model,
        "alias": alias,
        "version": version,
        "previous": previous["version"] if previous else None,
        "at": now.isoformat(timespec="seconds"),
        "by": _who(),
        "reason": reason,
    }
    event = store.url("models", model, "aliases", "history", alias, f"{now:%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex[:8]}.json")
    write_json_atomic(store, event, pointer)
    write_json_atomic(store, alias_url(store, model, alias), pointer)
    return pointer


def _who() -> str:
    try:
        return f"{getpass.getuser()}@{platform.node()}"
    except Exception:
        return "unknown"


def register(store: Store, cleaned: CleanResult, trained: TrainResult, evaluation: EvaluationResult) -> str:
    card = {
        "model": trained.model,
        "version": trained.version,
        "registered_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "metrics": asdict(evaluation.metrics),
        "baseline": {"name": evaluation.baseline_name, "metrics": asdict(evaluation.baseline)},
        "holdout_rows": evaluation.holdout_rows,
        "params": trained.xgb_params,
        "best_iteration": trained.best_iteration,
        "features": trained.features,
        "categories": trained.categories,
        "datasets": {"silver": cleaned.silver.version, "silver_url": cleaned.silver.url},
        "split": trained.split,
        "training": {"rows": trained.train_rows, "valid_rows": trained.valid_rows, "seconds": trained.seconds,
                     "device": trained.device, "host": platform.machine()},
        "plots": evaluation.plots,
    }
    url = posixpath.join(trained.model_url, CARD)
    write_json_atomic(store, url, card)
    return url


def gate(evaluation: EvaluationResult, params: GateParams) -> tuple[bool, str]:
    """Whether the challenger may replace the champion, and why."""
    ours = getattr(evaluation.metrics, params.metric)
    if params.must_beat_baseline:
        base = getattr(evaluation.baseline, params.metric)
        if ours <= base:
            return False, f"{params.metric} {ours:.4f} does not beat the baseline's {base:.4f}"
    champ = evaluation.champion
    if champ is None:
        return True, f"no champion yet; {params.metric} {ours:.4f} beats the baseline"
    if champ.metrics is None:
        return False, f"champion {champ.version} could not be scored on this holdout ({champ.note}); keeping it"
    theirs = getattr(champ.metrics, params.metric)
    if ours >= theirs - params.tolerance:
        return True, f"{params.metric} {ours:.4f} >= champion {champ.version}'s {theirs:.4f} - tolerance {params.tolerance}"
    return False, f"{params.metric} {ours:.4f} < champion {champ.version}'s {theirs:.4f} - tolerance {params.tolerance}"


def deploy(store: Store, cleaned: CleanResult, trained: TrainResult, evaluation: EvaluationResult,
           params: GateParams = GateParams()) -> DeployResult:
    card_url = register(store, cleaned, trained, evaluation)
    before = get_alias(store, trained.model)
    before_version = before["version"] if before else None
    if before_version == trained.version:
        return DeployResult(trained.model, trained.version, card_url, False, before_version, before_version,
                            "already the champion")
    ok, why = gate(evaluation, params)
    if ok:
        set_alias(store, trained.model, CHAMPION, trained.version, why)
    return DeployResult(trained.model, trained.version, card_url, ok, before_version,
                        trained.version if ok else before_version, why)
