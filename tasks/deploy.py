"""Deploy: register a model version and promote it to champion only if it passes the gate.

The registry (versions, aliases, history, compare-and-swap) lives in
``conveyor/store/registry.py``; this module decides *whether* to promote. The gate
metric is the spec's (from the silver manifest, unless the run names one), with
its direction (higher is better for AUC, F1, accuracy, R²; lower for RMSE, MAE,
log loss): the challenger must beat the naive baseline, and be at least as good
as the champion scored on the same holdout (``tasks/evaluate.py``) within a
tolerance; no guard metric (calibration, F1, ...) that the task has may regress
past its limit. The promotion itself is a compare-and-swap against the champion
the challenger was evaluated against, so two runs finishing at once cannot both win.

The card carries the feature schema (``card["schema"]``): the silver schema plus
each feature's type (numeric, or categorical with its allowed values), from
which serving builds its typed request model.
"""

from __future__ import annotations

import os
import platform
import posixpath
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from conveyor.store.registry import (  # noqa: F401  (re-exported: callers import these from conveyor.tasks.deploy)
    CARD,
    CHAMPION,
    AliasConflict,
    alias_url,
    get_alias,
    read_alias,
    register_card,
    set_alias,
)
from conveyor.store.storage import Store, code_version, write_bytes_atomic
from conveyor.tasks.evaluate import (  # noqa: F401  (HIGHER/LOWER_IS_BETTER re-exported)
    HIGHER_IS_BETTER,
    LOWER_IS_BETTER,
    EvaluationResult,
    higher_is_better,
    metric_names,
)
from conveyor.tasks.spec import SilverSchema
from conveyor.tasks.train import TrainResult, silver_schema

if TYPE_CHECKING:
    from conveyor.tasks.clean import CleanResult
    from conveyor.tasks.reference import ReferenceScores

# How far a guard metric may get worse than the champion's before the challenger is refused
# (a guard the task does not have, e.g. calibration for a regression, is not applied).
DEFAULT_GUARDS: dict[str, float] = {"calibration_error": 0.02, "f1": 0.03}


@dataclass(frozen=True)
class GateParams:
    metric: str | None = None  # None: the spec's gate metric (EvaluationResult.gate_metric)
    tolerance: float = 0.0  # challenger may be this much worse than the champion and still win
    must_beat_baseline: bool = True
    guards: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_GUARDS))

    def __post_init__(self) -> None:
        for name in (*([self.metric] if self.metric is not None else []), *self.guards):
            if name not in HIGHER_IS_BETTER | LOWER_IS_BETTER:
                raise ValueError(
                    f"gate metric {name!r} is not one of {sorted(HIGHER_IS_BETTER | LOWER_IS_BETTER)}"
                )
        for name, limit in self.guards.items():
            if limit < 0:
                raise ValueError(f"gate guard {name!r}: the allowed regression must be >= 0, not {limit}")


@dataclass(frozen=True)
class GateCheck:
    """One line of the gate's verdict, for the report."""

    name: str  # "baseline", "metric", "guard"
    metric: str
    challenger: float
    reference: float | None  # the baseline's or champion's value
    limit: float  # allowed shortfall (tolerance or guard limit)
    passed: bool
    detail: str


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    checks: list[GateCheck] = field(default_factory=list)


@dataclass(frozen=True)
class DeployResult:
    model: str
    version: str
    card_url: str
    promoted: bool
    champion_before: str | None
    champion_after: str | None
    reason: str
    checks: list[GateCheck] = field(default_factory=list)
    report_markdown: str = ""


def shortfall(metric: str, challenger: float, reference: float) -> float:
    """How much worse the challenger is than the reference (negative: better), whatever the metric's
    direction."""
    return reference - challenger if higher_is_better(metric) else challenger - reference


def feature_schema(schema: SilverSchema, trained: TrainResult) -> dict[str, Any]:
    """``card["schema"]``: the silver schema as trained, plus each feature's type for a typed request model.

    ``feature_types[name]`` is ``{"kind": "numeric", "dtype": "float32"}`` or
    ``{"kind": "categorical", "values": [...]}`` (the levels seen in training;
    another value is accepted and scored as missing).
    """
    out = schema.to_extra() | {
        "features": list(trained.features),
        "categories": {k: list(v) for k, v in trained.categories.items()},
        "categorical": [f for f in trained.features if f in trained.categories],
        "label": trained.label,
        "task": trained.task,
        "classes": list(trained.classes),
    }
    out["feature_types"] = {
        f: {"kind": "categorical", "values": list(trained.categories[f])}
        if f in trained.categories
        else {"kind": "numeric", "dtype": "float32"}
        for f in trained.features
    }
    return out


def register(store: Store, cleaned: CleanResult, trained: TrainResult, evaluation: EvaluationResult) -> str:
    """Write the version's card once (holdout metrics, params, data and code versions, hardware, schema)."""
    schema = silver_schema(store, cleaned.silver.url)
    card = {
        "model": trained.model,
        "version": trained.version,
        "registered_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "metrics": asdict(evaluation.metrics),
        "baseline": {"name": evaluation.baseline_name, "metrics": asdict(evaluation.baseline)},
        "holdout_rows": evaluation.holdout_rows,
        "family": trained.family,
        "model_file": trained.model_file,
        "hyperparameters": trained.hyperparameters,
        "params": trained.xgb_params,
        "best_iteration": trained.best_iteration,
        "lineage": {"search": trained.search} if trained.search else {},
        "features": trained.features,
        "categories": trained.categories,
        "schema": feature_schema(schema, trained),
        "datasets": {"silver": cleaned.silver.version, "silver_url": cleaned.silver.url},
        "split": trained.split,
        "training": {
            "rows": trained.train_rows,
            "valid_rows": trained.valid_rows,
            "seconds": trained.seconds,
            "device": trained.device,
            "host": platform.machine(),
        },
        "hardware": {
            "device": trained.device,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "plots": evaluation.plots,
    }
    return register_card(store, trained.model, trained.version, card)


def gate_metric(evaluation: EvaluationResult, params: GateParams) -> str:
    """The metric the gate compares: the run's choice, else the spec's; it must be one of the task's."""
    metric = params.metric or evaluation.gate_metric
    allowed = metric_names(evaluation.task)
    if metric not in allowed:
        raise ValueError(
            f"gate metric {metric!r} is not a {evaluation.task} metric (choose from {list(allowed)})"
        )
    return metric


def reference_check(reference: ReferenceScores, tolerance: float) -> GateCheck:
    """The challenger against the champion on the operator's pinned holdout (fails closed: no score, no
    promotion)."""
    metric, ours, theirs = reference.metric, reference.challenger, reference.champion
    if ours is None or theirs is None:
        return GateCheck("reference", metric, float("nan"), None, tolerance, False, reference.note)
    ok = shortfall(metric, ours, theirs) <= tolerance
    return GateCheck(
        "reference",
        metric,
        ours,
        theirs,
        tolerance,
        ok,
        f"on the reference holdout {reference.dataset} ({reference.rows} rows) {metric} {ours:.4f} is "
        f"{'no worse than' if ok else 'worse than'} the champion's {theirs:.4f} (tolerance {tolerance})",
    )


def decide(
    evaluation: EvaluationResult, params: GateParams, reference: ReferenceScores | None = None
) -> GateDecision:
    """Every check of the gate, and the first reason to refuse (or why it passed)."""
    metric = gate_metric(evaluation, params)
    task_metrics = metric_names(evaluation.task)
    guards = {name: limit for name, limit in params.guards.items() if name in task_metrics}
    ours = getattr(evaluation.metrics, metric)
    checks: list[GateCheck] = []
    if params.must_beat_baseline:
        base = getattr(evaluation.baseline, metric)
        ok = shortfall(metric, ours, base) < 0
        checks.append(
            GateCheck(
                "baseline",
                metric,
                ours,
                base,
                0.0,
                ok,
                f"{metric} {ours:.4f} {'beats' if ok else 'does not beat'} the baseline's {base:.4f}",
            )
        )
    champ = evaluation.champion
    if champ is None or champ.metrics is None:
        failed = [c.detail for c in checks if not c.passed]
        if failed:
            return GateDecision(False, failed[0], checks)
        if champ is None:
            return GateDecision(True, f"no champion yet; {metric} {ours:.4f} beats the baseline", checks)
        return GateDecision(
            False,
            f"champion {champ.version} could not be scored on this holdout ({champ.note}); keeping it",
            checks,
        )
    theirs = getattr(champ.metrics, metric)
    ok = shortfall(metric, ours, theirs) <= params.tolerance
    higher = higher_is_better(metric)
    cmp = (">=" if ok else "<") if higher else ("<=" if ok else ">")
    sign = "-" if higher else "+"
    checks.append(
        GateCheck(
            "metric",
            metric,
            ours,
            theirs,
            params.tolerance,
            ok,
            f"{metric} {ours:.4f} {cmp} champion {champ.version}'s {theirs:.4f} "
            f"{sign} tolerance {params.tolerance}",
        )
    )
    for name, limit in guards.items():
        mine, ref = getattr(evaluation.metrics, name), getattr(champ.metrics, name)
        worse = shortfall(name, mine, ref)
        passed = worse <= limit
        checks.append(
            GateCheck(
                "guard",
                name,
                mine,
                ref,
                limit,
                passed,
                f"guard {name} {mine:.4f} vs champion {champ.version}'s {ref:.4f}: "
                f"{'worse' if worse > 0 else 'no worse'} by {max(worse, 0.0):.4f} (limit {limit})",
            )
        )
    lead = checks[-len(guards) - 1].detail
    if reference is not None:
        checks.append(reference_check(reference, params.tolerance))
    failed = [c for c in checks if not c.passed]
    if failed:
        return GateDecision(False, "; ".join(c.detail for c in failed), checks)
    # Every check is listed (the report shows them all); the metric check's wording leads a pass.
    return GateDecision(
        True,
        lead
        + (f"; guards within limits ({', '.join(guards)})" if guards else "")
        + ("; no worse on the reference holdout" if reference is not None else ""),
        checks,
    )


def gate(evaluation: EvaluationResult, params: GateParams) -> tuple[bool, str]:
    """Whether the challenger may replace the champion, and why."""
    decision = decide(evaluation, params)
    return decision.promote, decision.reason


def render_gate(decision: GateDecision, version: str, promoted: bool) -> str:
    """The gate section of report.md: each check side by side, and the verdict in words."""
    lines = [
        "## Deploy gate",
        "",
        "| check | metric | challenger | reference | allowed shortfall | result |",
        "|---|---|---|---|---|---|",
    ]
    for c in decision.checks:
        ref = "" if c.reference is None else f"{c.reference:.4f}"
        lines.append(
            f"| {c.name} | {c.metric} | {c.challenger:.4f} | {ref} | {c.limit:g} | "
            f"{'pass' if c.passed else '**FAIL**'} |"
        )
    verdict = f"promoted {version} to champion" if promoted else f"{version} was NOT promoted"
    lines += ["", f"**Verdict:** {verdict}: {decision.reason}"]
    return "\n".join(lines)


def deploy(
    store: Store,
    cleaned: CleanResult,
    trained: TrainResult,
    evaluation: EvaluationResult,
    params: GateParams = GateParams(),
    reference: ReferenceScores | None = None,
) -> DeployResult:
    """Register the version's card and promote it if it passes the gate (and, when the operator pinned
    one, the reference holdout: ``reference``, scored by :func:`conveyor.tasks.reference.score_reference`)."""
    gate_metric(evaluation, params)  # a metric the task does not have fails before anything is written
    card_url = register(store, cleaned, trained, evaluation)
    before = read_alias(store, trained.model)
    before_version = before.version if before else None
    if before_version == trained.version:
        return DeployResult(
            trained.model,
            trained.version,
            card_url,
            False,
            before_version,
            before_version,
            "already the champion",
        )
    evaluated_against = evaluation.champion.version if evaluation.champion else None
    if evaluated_against != before_version:
        decision = GateDecision(
            False,
            f"the champion is {before_version} but the challenger was evaluated against "
            f"{evaluated_against}; re-evaluate on the same holdout before promoting",
        )
    else:
        decision = decide(evaluation, params, reference)
    promoted, reason = decision.promote, decision.reason
    if promoted:
        try:
            set_alias(
                store,
                trained.model,
                CHAMPION,
                trained.version,
                reason,
                expected=before_version,
                action="promote",
            )
        except AliasConflict as exc:
            promoted, reason = False, f"lost a concurrent promotion: {exc}"
    after = trained.version if promoted else before_version
    report = f"{evaluation.report_markdown}\n\n{render_gate(decision, trained.version, promoted)}"
    if not promoted and reason != decision.reason:
        report += f"\n\n{reason}"
    write_bytes_atomic(store, posixpath.join(trained.model_url, "report.md"), report.encode())
    return DeployResult(
        trained.model,
        trained.version,
        card_url,
        promoted,
        before_version,
        after,
        reason,
        decision.checks,
        report,
    )
