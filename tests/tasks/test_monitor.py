"""Monitoring: pure checks on real silver data, and a breach that emits an event, an artifact and an alert."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from conveyor.flows.params import MonitorOptions, PipelineParams
from conveyor.store.storage import read_dataset
from conveyor.tasks import monitor
from conveyor.tasks.monitor import Thresholds, check_data, check_model, profile_frame, psi
from tests.support import wait_for

LABEL = "is_late"  # the flights spec's label (pipelines/flights.yaml)


@pytest.fixture(scope="module")
def silver(pipeline_run) -> pd.DataFrame:
    cleaned = pipeline_run.cleaned
    return read_dataset(pipeline_run.store, cleaned.silver.url, columns=[*cleaned.features, LABEL]).compute()


def _profile(frame: pd.DataFrame, version: str = "v1", reference=None, rows_in=None, quarantined=0):
    return profile_frame(
        frame, "silver_flights", version, rows_in or len(frame), quarantined, list(frame.columns), reference
    )


def test_thresholds_have_one_set_of_defaults() -> None:
    assert MonitorOptions().to_thresholds() == Thresholds()
    assert PipelineParams().monitor.to_thresholds() == Thresholds()


def test_real_silver_data_passes_the_default_thresholds(pipeline_run, silver) -> None:
    cleaned = pipeline_run.cleaned
    prof = _profile(silver, rows_in=cleaned.rows_in, quarantined=cleaned.quarantine.rows)
    same = _profile(
        silver, "v2", reference=prof, rows_in=cleaned.rows_in, quarantined=cleaned.quarantine.rows
    )
    report = check_data(same, Thresholds(), previous=prof, training=prof)
    assert report.breaches == [], report.breaches
    names = {c.name for c in report.checks}
    assert {"row_change", "quarantine_share", "null_rate:wind_gust", "psi:distance", "psi:carrier"} <= names
    assert all(
        c.value < 1e-9 for c in report.checks if c.name.startswith("psi:")
    )  # the same data does not drift


def test_drift_nulls_row_change_and_quarantine_are_flagged(silver) -> None:
    reference = _profile(silver)
    drifted = silver.iloc[: len(silver) // 3].copy()  # a third of the rows ...
    drifted["distance"] = drifted["distance"] * 3  # ... flown three times as far ...
    drifted.loc[drifted.index[: len(drifted) // 2], "temp"] = np.nan  # ... half without a temperature
    drifted["carrier"] = "UA"  # ... all one carrier
    current = _profile(drifted, "v2", reference=reference, rows_in=len(drifted) * 2, quarantined=len(drifted))
    report = check_data(current, Thresholds(), previous=reference, training=reference)
    breached = {c.name for c in report.breaches}
    assert {"row_change", "null_rate:temp", "quarantine_share", "psi:distance", "psi:carrier"} <= breached
    assert "psi:sched_dep_hour" not in breached  # what did not change is not flagged
    assert next(c for c in report.breaches if c.name == "psi:distance").value > 1


def test_psi_is_zero_for_equal_shares_and_grows_with_the_shift() -> None:
    assert psi([0.25] * 4, [0.25] * 4) == 0
    assert 0 < psi([0.25] * 4, [0.3, 0.2, 0.25, 0.25]) < psi([0.25] * 4, [0.7, 0.1, 0.1, 0.1])


def test_model_worse_than_champion_is_flagged() -> None:
    thresholds = Thresholds(max_metric_drop=0.01)
    worse = check_model("m", "v2", {"roc_auc": 0.66}, {"roc_auc": 0.68}, "v1", thresholds)
    assert [c.name for c in worse.breaches] == ["metric_drop:roc_auc"] and "champion v1" in worse.breaches[
        0
    ].detail
    assert check_model("m", "v2", {"roc_auc": 0.675}, {"roc_auc": 0.68}, "v1", thresholds).breaches == []
    assert check_model("m", "v1", {"roc_auc": 0.6}, None, None, thresholds).checks == []  # no champion yet
    loss = check_model(
        "m", "v2", {"log_loss": 0.60}, {"log_loss": 0.55}, "v1", replace(thresholds, metric="log_loss")
    )
    assert loss.breaches and loss.breaches[0].value == pytest.approx(0.05)  # lower is better for a loss


# --- the Prefect wiring: event, artifact, alert --------------------------------------------


def _from_the_api(read, what: str):
    """What the Prefect API holds, polled: events go through a background worker and the server's
    event pipeline (drained first)."""
    from conveyor.prefect_api import drain_prefect

    drain_prefect()
    return wait_for(read, what)


def test_a_breach_emits_an_event_publishes_an_artifact_and_alerts(
    prefect_api, pipeline_run, dask_client, receiver, monkeypatch
) -> None:
    import json
    import uuid

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    from conveyor.flows.monitoring import BREACH_EVENT, monitor_data_task

    url, received = receiver
    monkeypatch.setenv("CONVEYOR_ALERT_WEBHOOKS", url)
    monkeypatch.setenv("CONVEYOR_ALERT_APPRISE", "")
    monkeypatch.delenv("CONVEYOR_STORAGE_OPTIONS", raising=False)
    strict = Thresholds(max_null_rate=0.1)  # pressure, plane_age, seats and engines are sparser than that
    run_tag = f"test-run-{uuid.uuid4().hex[:8]}"  # tells this test's event from any other's

    @flow
    def check():
        return monitor_data_task(
            dask_client.scheduler.address,
            pipeline_run.store.root,
            pipeline_run.cleaned,
            "flights_late",
            strict,
            600,
            flow_run_id=run_tag,
        )

    state = check(return_state=True)
    outcome = state.result()
    assert {"null_rate:pressure", "null_rate:plane_age"} <= set(outcome.breaches)
    assert outcome.alerts_delivered == outcome.alerts_sent == 1
    [alert] = received
    assert alert["kind"] == "monitor.threshold" and "null_rate:pressure" in alert["details"]["breaches"]

    # What reached the API: the breach event ...
    resource = f"conveyor.dataset.silver_flights.{pipeline_run.cleaned.silver.version}"
    wanted = EventFilter(
        event=EventNameFilter(name=[BREACH_EVENT]), resource=EventResourceFilter(id=[resource])
    )

    def breach_events():
        with get_client(sync_client=True) as client:
            events = client.read_events(filter=wanted, limit=50).events
        return [e for e in events if e.payload.get("flow_run_id") == run_tag]

    [event] = _from_the_api(breach_events, f"the {BREACH_EVENT} event in the Prefect API")
    assert {b["check"] for b in event.payload["breaches"]} == set(outcome.breaches)

    # ... and the table artifact of this flow run, with every check and the breached ones marked.
    key = "conveyor-monitor-silver-flights"
    artifacts_of_run = ArtifactFilter(
        key=ArtifactFilterKey(any_=[key]),
        flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]),
    )

    def artifacts():
        with get_client(sync_client=True) as client:
            return client.read_artifacts(artifact_filter=artifacts_of_run)

    [artifact] = _from_the_api(artifacts, f"the {key} artifact in the Prefect API")
    assert artifact.type == "table" and "breached" in artifact.description
    rows = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    assert {r["name"] for r in rows if r["breached"]} == set(outcome.breaches)
    # The profile is stored: the next clean run compares its row count against this version.
    latest = monitor.latest_profile(pipeline_run.store, "silver_flights")
    assert latest is not None and latest.version == pipeline_run.cleaned.silver.version


def test_the_version_the_champion_was_trained_on_is_read_not_profiled_again(
    pipeline_run, dask_client, tmp_path, monkeypatch
) -> None:
    """A rerun on the champion's own silver version: its stored profile is this version's profile
    on the same bins, so the checks read it (profiling it again cost a Dask pass per rerun)."""
    import shutil

    from conveyor.flows.monitoring import check_clean_run
    from conveyor.store.storage import Store

    source = pipeline_run.store
    shutil.copytree(source.path(source.root), tmp_path / "store")
    store = Store.from_url((tmp_path / "store").as_uri())
    cleaned, model = pipeline_run.cleaned, pipeline_run.trained.model
    first = check_clean_run(store, cleaned, model, Thresholds())

    def no_profiling(*args, **kwargs):
        raise AssertionError("profiled a version whose profile is stored")

    monkeypatch.setattr(monitor, "profile_dataset", no_profiling)
    again = check_clean_run(store, cleaned, model, Thresholds())
    assert [(c.name, c.value) for c in again.checks] == [(c.name, c.value) for c in first.checks]
    assert again.breaches == first.breaches == []
    assert any(c.name.startswith("psi:") for c in again.checks)  # checked against the training data

    # Another row count for the same version (a different quarantine): profiled again.
    other = replace(cleaned, rows_in=cleaned.rows_in + 1)
    with pytest.raises(AssertionError, match="profiled a version"):
        check_clean_run(store, other, model, Thresholds())
