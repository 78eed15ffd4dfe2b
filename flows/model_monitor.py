"""Model monitor flow: score the live champion on recent labelled data; roll back when it misbehaves.

The check (``conveyor.tasks.scoring.monitor_check``) compares the champion's gate
metric (its card's: ROC AUC for the flights model, RMSE for a regression, ...)
on ``data_url`` (or on a replay of its own holdout) with the value on its card;
a worsening past ``max_auc_drop`` (absolute for scores in [0, 1], relative for
errors such as RMSE) rolls the champion back (``conveyor.store.registry.rollback``,
compare-and-swap, recorded in the alias history) and raises a
``model.rollback`` alert. Serving picks the rolled-back version up on its next
poll. Schedule it like any deployment.

    python -m conveyor.flows.model_monitor --help
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefect import flow, get_run_logger, task
from pydantic import BaseModel, ConfigDict, Field, field_validator

from conveyor import operator
from conveyor.cluster import dask_cluster, quiet_dask_logs
from conveyor.flows.params import (
    ClusterChoice,
    OptionalCount,
    OptionalText,
    StorageURL,
    blank_field,
    cluster_field,
    model_field,
    storage_field,
    workers_field,
)
from conveyor.flows.scoring import stage_options
from conveyor.resources import dask_client, open_store
from conveyor.store.registry import AliasConflict, RegistryError, rollback
from conveyor.store.storage import Store
from conveyor.tasks.scoring import MonitorCheck, monitor_check


class MonitorParams(BaseModel):
    """Parameters of the model monitor."""

    model_config = ConfigDict(extra="forbid")

    storage_url: StorageURL = storage_field()
    model: str = model_field()
    data_url: OptionalText = blank_field(  # type: ignore[valid-type]
        "",
        title="Recent labelled data",
        description="a committed dataset with the features and the label; "
        "empty = replay the holdout of the champion's silver dataset",
    )
    max_auc_drop: float = Field(
        0.05,
        ge=0,
        le=1,
        title="Roll back when the live gate metric is worse than the card's by more than",
        description="absolute for scores in [0, 1] (AUC, F1, R²); a share of the card's value for errors "
        "(RMSE, MAE, log loss)",
    )
    min_rows: int = Field(500, ge=1, title="Fewest labelled rows for a verdict")
    auto_rollback: bool = Field(True, title="Roll back automatically on a breach")
    cluster: ClusterChoice = cluster_field()
    n_workers: OptionalCount = workers_field()  # type: ignore[valid-type]

    @field_validator("data_url")
    @classmethod
    def _data(cls, value: str | None) -> str | None:
        return operator.confine_url(value, "storage") if value else value

    @field_validator("n_workers")
    @classmethod
    def _workers(cls, value: int | None) -> int | None:
        return operator.confine_workers(value)


@dataclass(frozen=True)
class MonitorOutcome:
    check: MonitorCheck
    rolled_back: bool
    rolled_back_to: str | None
    note: str


def _default_alert(kind: str, title: str, details: dict[str, Any], severity: str) -> None:
    from conveyor.alerts import Alert, send_alert

    send_alert(Alert(kind=kind, title=title, details=details, severity=severity))


def act(
    store: Store, check: MonitorCheck, auto_rollback: bool = True, alert: Any = _default_alert
) -> MonitorOutcome:
    """Roll back (and alert) when the check breached its threshold; alert only when rollback is impossible."""
    if not check.breached:
        return MonitorOutcome(check, False, None, check.reason)
    details = {
        "model": check.model,
        "version": check.version,
        "metric": check.metric,
        f"live_{check.metric}": round(check.value, 4),
        f"card_{check.metric}": round(check.card_value, 4),
        "max_drop": check.max_drop,
        "rows": check.rows,
        "data_url": check.data_url,
    }
    if not auto_rollback:
        alert(
            "monitor.threshold",
            f"{check.model}: champion {check.version} breached its threshold",
            details,
            "error",
        )
        return MonitorOutcome(check, False, None, f"{check.reason}; auto-rollback is off")
    try:
        event = rollback(
            store, check.model, reason=f"auto-rollback by the monitor: {check.reason}", by="model-monitor"
        )
    except (RegistryError, AliasConflict) as exc:
        alert(
            "monitor.threshold",
            f"{check.model}: champion {check.version} breached its threshold and could not be rolled back",
            details | {"error": str(exc)},
            "error",
        )
        return MonitorOutcome(check, False, None, f"{check.reason}; rollback impossible: {exc}")
    alert(
        "model.rollback",
        f"{check.model}: rolled back {check.version} -> {event.version}",
        details | {"rolled_back_to": event.version, "reason": check.reason},
        "error",
    )
    return MonitorOutcome(check, True, event.version, f"{check.reason}; rolled back to {event.version}")


def monitor_once(
    store: Store, client: Any, params: MonitorParams, alert: Any = _default_alert
) -> MonitorOutcome:
    """One check-and-act cycle (the flow's body, usable without Prefect)."""
    check = monitor_check(store, client, params.model, params.data_url, params.max_auc_drop, params.min_rows)
    return act(store, check, params.auto_rollback, alert)


@task(**stage_options("monitor", like="evaluate"))
def monitor_task(address: str, params: MonitorParams) -> MonitorOutcome:
    with dask_client(address) as client:
        return monitor_once(open_store(params.storage_url), client, params)


@flow(name="conveyor-model-monitor")
def model_monitor(params: MonitorParams = MonitorParams()) -> MonitorOutcome:
    """Check the live champion against its card and roll it back if it misbehaves."""
    quiet_dask_logs()
    logger = get_run_logger()
    with dask_cluster(params.cluster, params.n_workers) as address:
        outcome = monitor_task.submit(address, params).result()
    (logger.warning if outcome.rolled_back else logger.info)("monitor: %s", outcome.note)
    return outcome


if __name__ == "__main__":
    from conveyor.launch import flow_main

    raise SystemExit(flow_main(model_monitor, MonitorParams))
