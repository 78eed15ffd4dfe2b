"""Prefect wiring of the monitoring checks (tasks/monitor.py): event, artifact and alert on a breach.

The training flow calls :func:`monitor_data_task` after clean and
:func:`monitor_model_task` after evaluate. A breach never fails the run: it
emits ``conveyor.monitor.breach``, publishes a table artifact and alerts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.events import emit_event

from conveyor.alerts import Alert, send_alert
from conveyor.policy import POLICIES, run_stage, task_options
from conveyor.resources import open_store
from conveyor.store.storage import Store, exists, read_json
from conveyor.tasks import monitor
from conveyor.tasks.clean import CleanResult
from conveyor.tasks.deploy import get_alias
from conveyor.tasks.evaluate import EvaluationResult
from conveyor.tasks.monitor import MonitorReport, Thresholds
from conveyor.tasks.train import TrainResult, silver_schema

BREACH_EVENT = "conveyor.monitor.breach"


@dataclass(frozen=True)
class MonitorOutcome:
    subject: str
    checks: int
    breaches: list[str]  # check names
    alerts_delivered: int
    alerts_sent: int


def publish(report: MonitorReport, resource_id: str, flow_run_id: str = "") -> MonitorOutcome:
    """Artifact always (the checks, breached or not); event and alert for breaches."""
    logger = get_run_logger()
    key = "conveyor-monitor-" + report.subject.split()[0].replace("_", "-")
    breaches = report.breaches
    create_table_artifact(
        key=key,
        table=report.to_rows(),
        description=f"Monitoring of {report.subject}: "
        f"{len(breaches)} of {len(report.checks)} checks breached",
    )
    delivered = sent = 0
    if breaches:
        summary = "; ".join(f"{c.name} = {c.value:g} > {c.threshold:g}" for c in breaches)
        logger.warning("monitor: %d thresholds breached for %s: %s", len(breaches), report.subject, summary)
        emit_event(
            event=BREACH_EVENT,
            resource={"prefect.resource.id": resource_id, "prefect.resource.name": report.subject},
            payload={
                "subject": report.subject,
                "flow_run_id": flow_run_id,
                "breaches": [
                    {"check": c.name, "value": c.value, "threshold": c.threshold, "detail": c.detail}
                    for c in breaches
                ],
            },
        )
        from conveyor.alerts import run_url

        deliveries = send_alert(
            Alert(
                kind="monitor.threshold",
                title=f"{len(breaches)} monitoring thresholds breached for {report.subject}",
                details={
                    "subject": report.subject,
                    "breaches": summary,
                    "flow_run_id": flow_run_id,
                    "url": run_url(flow_run_id) if flow_run_id else "",
                },
                severity="warning",
            )
        )
        delivered, sent = sum(d.delivered for d in deliveries), len(deliveries)
    else:
        logger.info("monitor: %s passed %d checks", report.subject, len(report.checks))
    return MonitorOutcome(report.subject, len(report.checks), [c.name for c in breaches], delivered, sent)


def check_clean_run(store: Store, cleaned: CleanResult, model: str, thresholds: Thresholds) -> MonitorReport:
    """Profile the new silver version and check it against the last one and the champion's training data."""
    schema = silver_schema(store, cleaned.silver.url)
    dataset = cleaned.silver.name
    columns = [*schema.features, schema.label]
    previous = monitor.latest_profile(store, dataset)
    training = None
    champion = get_alias(store, model)
    if champion:
        info = store.url("models", model, champion["version"], "train.json")
        silver_version = read_json(store, info).get("silver_version") if exists(store, info) else None
        if silver_version:
            training = monitor.training_profile(store, dataset, silver_version, columns)
    if _profiled(training, cleaned, columns):
        # The champion was trained on this very version, so its stored profile is this version's
        # profile on the same bins (a committed version never changes): read, not recomputed.
        current = replace(training, columns={c: training.columns[c] for c in columns})  # stored sorted
    else:
        current = monitor.profile_dataset(
            store,
            cleaned.silver.url,
            dataset,
            cleaned.silver.version,
            cleaned.rows_in,
            cleaned.quarantine.rows,
            columns,
            reference=training,
        )
    if previous is not None and previous.version == current.version:
        previous = None  # the same version again: nothing new to compare
    report = monitor.check_data(current, thresholds, previous, training)
    monitor.save_profile(store, current)
    return report


def _profiled(profile: monitor.DataProfile | None, cleaned: CleanResult, columns: list[str]) -> bool:
    """``profile`` is the stored profile of the cleaned version itself, of the same columns and counts."""
    return (
        profile is not None
        and profile.version == cleaned.silver.version
        and profile.dataset == cleaned.silver.name
        and (profile.rows, profile.rows_in, profile.quarantined)
        == (cleaned.silver.rows, cleaned.rows_in, cleaned.quarantine.rows)
        and set(profile.columns) == set(columns)
    )


@task(**task_options("monitor") | {"name": "monitor-data"})
def monitor_data_task(
    address: str | None,
    storage_url: str,
    cleaned: CleanResult,
    model: str,
    thresholds: Thresholds,
    timeout_seconds: float = POLICIES["monitor"].timeout_seconds,
    flow_run_id: str = "",
    restart_workers: bool = True,
) -> MonitorOutcome:
    report = run_stage(
        "monitor",
        lambda client: check_clean_run(open_store(storage_url), cleaned, model, thresholds),
        address,
        timeout_seconds,
        restart_workers,
    )
    return publish(report, f"conveyor.dataset.{cleaned.silver.name}.{cleaned.silver.version}", flow_run_id)


@task(**task_options("monitor") | {"name": "monitor-model"})
def monitor_model_task(
    trained: TrainResult, evaluation: EvaluationResult, thresholds: Thresholds, flow_run_id: str = ""
) -> MonitorOutcome:
    from dataclasses import asdict

    champion = evaluation.champion
    champion_metrics: dict[str, Any] | None = (
        asdict(champion.metrics) if champion and champion.metrics else None
    )
    report = monitor.check_model(
        trained.model,
        trained.version,
        asdict(evaluation.metrics),
        champion_metrics,
        champion.version if champion else None,
        thresholds,
        evaluation.gate_metric,
    )
    return publish(report, f"conveyor.model.{trained.model}.{trained.version}", flow_run_id)
