"""Deployments against a real `prefect server` subprocess: registration, schedules, the UI form,
an API-triggered run executed by a worker, an event-triggered run, and concurrency limits."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from conveyor.prefect_api import free_port, start_server
from conveyor.serve_local import POOL, QUEUES, register, start_worker, stop_group

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    api = start_server(home, free_port(), home / "server.log")
    try:
        register(api)
        yield api
    finally:
        api.stop()


def _run(server, coro_fn):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def main():
        async with get_client() as client:
            return await coro_fn(client)

    with temporary_settings({PREFECT_API_URL: server.url}):
        return asyncio.run(main())


def _deployment(server, name: str):
    async def read(client):
        return {d.name: d for d in await client.read_deployments()}[name]

    return _run(server, read)


def test_every_deployment_registers_with_schedule_pool_and_form(server) -> None:
    async def read(client):
        return {d.name: d for d in await client.read_deployments()}, await client.read_work_queues(
            work_pool_name=POOL
        )

    deployments, queues = _run(server, read)
    assert set(deployments) == {
        "nightly",
        "on-demand",
        "on-new-data",
        "watch-landing",
        "batch-scoring",
        "watch-scoring",
        "score-new-data",
        "monitor-hourly",
    }
    nightly = deployments["nightly"].schedules[0].schedule
    assert (nightly.cron, nightly.timezone) == ("0 3 * * *", "UTC")
    assert deployments["monitor-hourly"].schedules[0].schedule.cron == "0 * * * *"
    assert {q.name: q.priority for q in queues if q.name in QUEUES} == QUEUES
    assert (
        deployments["nightly"].work_queue_name == "production"
        and deployments["on-demand"].work_queue_name == "adhoc"
    )

    form = deployments["on-demand"].parameter_openapi_schema
    fields = form["definitions"]["PipelineParams"]["properties"]
    assert (
        fields["storage_url"]["title"] == "Data · Storage root URL" and fields["storage_url"]["description"]
    )
    spec_choices = [c.get("enum") for c in fields["spec"].get("anyOf", []) if c.get("enum")]
    assert spec_choices and {"flights", "county_murders"} <= set(spec_choices[0])  # the shipped-spec dropdown
    cluster_choices = [
        c.get("enum") for c in fields["cluster"].get("anyOf", [fields["cluster"]]) if c.get("enum")
    ]
    assert cluster_choices and set(cluster_choices[0]) == {"auto", "cpu", "gpu"}
    training_form = form["definitions"]["TrainingOptions"]["properties"]
    assert set(training_form["model"]["enum"]) == {"gbtree", "random_forest", "linear"}  # the family dropdown
    assert {"random_forest", "linear"} <= set(training_form) and "SearchOptions" in form["definitions"]
    assert deployments["on-demand"].global_concurrency_limit.limit == 1
    assert str(deployments["on-demand"].concurrency_options.collision_strategy.value) == "CANCEL_NEW"
    assert str(deployments["nightly"].concurrency_options.collision_strategy.value) == "ENQUEUE"


def test_a_run_triggered_through_the_api_completes(server, tmp_path: Path) -> None:
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    params = {
        "params": {
            "storage_url": (tmp_path / "store").as_uri(),
            "max_rows": 20_000,
            "cluster": "cpu",
            "n_workers": 1,
        }
    }
    with temporary_settings({PREFECT_API_URL: server.url}):
        run = run_deployment("conveyor-training/on-demand", parameters=params, timeout=0)
    worker = start_worker(server, tmp_path / "worker.log")
    try:
        deadline = time.monotonic() + 480
        while time.monotonic() < deadline:
            state = _run(server, lambda c: c.read_flow_run(run.id)).state
            if state.is_final():
                break
            time.sleep(2)
    finally:
        stop_group(worker)
    log = (tmp_path / "worker.log").read_text()
    assert state.is_completed(), f"{state.type}: {state.message}\n{log[-3000:]}"
    assert (tmp_path / "store" / "models" / "flights_late" / "aliases" / "champion.json").exists()


def test_the_landed_event_starts_the_event_driven_deployment(server, tmp_path: Path) -> None:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.events.clients import PrefectEventsClient
    from prefect.settings import PREFECT_API_URL, temporary_settings

    landed = "data/landing/2013-12"  # the trigger only takes events about the landing folder
    target = _deployment(server, "on-new-data")

    async def emit():
        async with PrefectEventsClient(api_url=server.url) as events:
            from prefect.events import Event

            await events.emit(
                Event(event="conveyor.dataset.landed", resource={"prefect.resource.id": landed})
            )

    with temporary_settings({PREFECT_API_URL: server.url}):
        asyncio.run(emit())

    async def runs(client):
        return await client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[target.id]))
        )

    deadline = time.monotonic() + 120
    found = []
    while time.monotonic() < deadline and not found:
        found = [r for r in _run(server, runs) if r.parameters.get("params", {}).get("source_url") == landed]
        time.sleep(2)
    assert found, "no flow run of on-new-data was created for the event"


@pytest.mark.parametrize(("name", "expected"), [("on-demand", "CANCELLED"), ("nightly", "SCHEDULED")])
def test_a_second_concurrent_run_is_cancelled_or_queued(server, name: str, expected: str) -> None:
    from prefect.states import Completed, Pending, Running

    deployment = _deployment(server, name)

    async def scenario(client):
        first = await client.create_flow_run_from_deployment(deployment.id)
        second = await client.create_flow_run_from_deployment(deployment.id)
        await client.set_flow_run_state(first.id, Pending())
        await client.set_flow_run_state(first.id, Running())
        await client.set_flow_run_state(second.id, Pending())
        blocked = (await client.read_flow_run(second.id)).state
        await client.set_flow_run_state(first.id, Completed())  # release the slot
        if not blocked.is_final():
            await client.delete_flow_run(second.id)
        return blocked

    blocked = _run(server, scenario)
    assert blocked.type.value == expected
    if expected == "SCHEDULED":
        assert blocked.name == "AwaitingConcurrencySlot"
