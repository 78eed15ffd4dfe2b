"""Alert delivery to a real local HTTP receiver; a dead destination is logged, never raised."""

from __future__ import annotations

import logging

from conveyor import alerts
from conveyor.alerts import Alert, send_alert


def test_webhook_receives_the_json_payload(receiver) -> None:
    url, received = receiver
    [delivery] = send_alert(
        Alert("flow.failed", "training failed", {"flow_run_id": "abc"}), webhooks=[url], apprise_urls=[]
    )
    assert delivery.delivered and delivery.attempts == 1
    assert received == [received[0]] and received[0]["kind"] == "flow.failed"
    assert received[0]["details"] == {"flow_run_id": "abc"}


def test_dead_destination_is_retried_then_logged(monkeypatch, caplog) -> None:
    from conveyor.prefect_api import free_port

    monkeypatch.setattr(alerts, "BACKOFF_S", 0.01)
    dead = f"http://127.0.0.1:{free_port()}/hook?token=secret"
    with caplog.at_level(logging.ERROR, logger="conveyor.alerts"):
        [delivery] = send_alert(Alert("flow.failed", "x"), webhooks=[dead], apprise_urls=[])
    assert not delivery.delivered and delivery.attempts == alerts.ATTEMPTS
    assert "ALERT NOT DELIVERED" in caplog.text
    assert "secret" not in caplog.text  # tokens in destination URLs never reach the log


# --- flow-run hooks and server-side automations, against a real Prefect API --------------------


def test_failed_flow_run_alert_names_flow_run_stage_error_and_link(
    prefect_api, receiver, monkeypatch
) -> None:
    from prefect import flow
    from prefect.runtime import flow_run

    from conveyor.alerts import mark_stage, on_failure
    from conveyor.errors import InputError

    url, received = receiver
    monkeypatch.setenv("CONVEYOR_ALERT_WEBHOOKS", url)
    monkeypatch.setenv("CONVEYOR_ALERT_APPRISE", "")

    @flow(name="conveyor-hook-probe", on_failure=[on_failure])
    def probe() -> None:
        mark_stage(str(flow_run.get_id()), "clean")
        raise InputError("flights.csv", "month", "expected int values, found 'May'")

    state = probe(return_state=True)
    assert state.is_failed()
    [alert] = received
    run_id = str(state.state_details.flow_run_id)
    assert alert["kind"] == "flow.failed" and alert["severity"] == "error"
    assert alert["details"]["flow"] == "conveyor-hook-probe" and alert["details"]["flow_run_id"] == run_id
    assert alert["details"]["stage"] == "clean"
    assert (
        alert["details"]["error"]
        == "InputError: flights.csv: field 'month': expected int values, found 'May'"
    )
    assert alert["details"]["url"].endswith(f"/runs/flow-run/{run_id}") and alert["details"][
        "url"
    ].startswith("http")


def test_automations_apply_creates_them_once(prefect_api, receiver) -> None:
    from prefect.client.orchestration import get_client

    from conveyor.cli.ops import DEFAULT_FILE, apply_automations, load_spec

    url, _ = receiver
    names = {a["name"] for a in load_spec(DEFAULT_FILE)["automations"]}
    first = apply_automations(DEFAULT_FILE, webhook_url=url)
    assert {a.name for a in first} == names and {a.action for a in first} == {"created"}
    again = apply_automations(DEFAULT_FILE, webhook_url=url)
    assert {a.action for a in again} == {"updated"} and {a.id for a in again} == {a.id for a in first}

    with get_client(sync_client=True) as client:
        stored = [a for name in sorted(names) for a in client.read_automations_by_name(name)]
        assert len(stored) == len(names)  # idempotent: no duplicates after re-apply
        failed = next(a for a in stored if a.name == "conveyor-flow-run-failed")
        assert failed.trigger.expect == {"prefect.flow-run.Failed"}
        [notify] = [a for a in failed.actions if a.type == "send-notification"]
        block = client.read_block_document(notify.block_document_id)
        assert block.data["url"] == url
        zombie = next(a for a in stored if a.name == "conveyor-flow-run-zombie")
        assert zombie.trigger.posture == "Proactive" and zombie.actions[0].type == "change-flow-run-state"
