"""The training flow against a real Prefect API (prefect_test_harness), on its own local Dask cluster."""

from __future__ import annotations

import asyncio

import pandas as pd
import pytest

from conveyor.flows.params import PipelineParams
from tests.support import allow_roots, source_with, wait_for

STAGES = ("ingest", "clean", "train", "evaluate", "deploy")


@pytest.fixture(autouse=True)
def _operator_allows_test_roots(monkeypatch, tmp_path_factory):
    """The operator's allowances for the temporary stores, sources and replicas these runs name."""
    allow_roots(monkeypatch, tmp_path_factory.getbasetemp())


def _read_task_runs(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    async def read():
        async with get_client() as client:
            return await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                sort=TaskRunSort.EXPECTED_START_TIME_DESC,
                limit=50,
            )

    return asyncio.run(read())


def _task_runs(flow_run_id, expect: set[str]):
    """The flow run's task runs, once one per name prefix in ``expect`` is recorded, all in final states.

    Task run states reach the API through a background worker, after the flow has returned:
    read straight away, the last ones may be missing or still running.
    """

    def settled():
        runs = _read_task_runs(flow_run_id)
        final = [r for r in runs if r.state is not None and r.state.is_final()]
        seen = all(any(r.name.startswith(prefix) for r in final) for prefix in expect)
        return runs if seen and len(final) == len(runs) else None

    return wait_for(settled, f"the task runs {sorted(expect)} of flow run {flow_run_id}")


def test_training_flow_end_to_end(prefect_api, tmp_path) -> None:
    from conveyor.flows.training import training

    replica = (tmp_path / "replica").as_uri()
    params = PipelineParams(
        storage_url=(tmp_path / "store").as_uri(),
        max_rows=30_000,
        cluster="cpu",
        n_workers=2,
        replicas=[replica],
    )
    state = training(params, return_state=True)

    assert state.is_completed(), state.message
    summary = state.result()
    assert summary.metrics["roc_auc"] > summary.baseline_metrics["roc_auc"]
    assert summary.promoted and summary.champion_after == summary.model_version
    assert set(summary.stage_seconds) == {"ingest", "clean", "train", "evaluate", "deploy", "total"}
    from conveyor.store.maintenance import verify
    from conveyor.store.storage import Store

    assert summary.extra["replicas"][replica]["copied"] == 13  # 5 tables x 2 + silver x 2 + the model
    assert verify(Store.from_url(replica)).ok
    runs = _task_runs(
        state.state_details.flow_run_id, {*STAGES, "monitor-data", "monitor-model", "replicate"}
    )
    stages = sorted(r.name.split("-")[0] for r in runs if not r.name.startswith(("monitor-", "replicate")))
    assert stages == ["clean", "deploy", "evaluate", "ingest", "train"]
    monitors = sorted(r.name.rsplit("-", 1)[0] for r in runs if r.name.startswith("monitor-"))
    assert monitors == ["monitor-data", "monitor-model"]
    assert all(r.state.is_completed() and r.run_count == 1 for r in runs)

    # The same run again: every stage finds its committed output, the evaluation included.
    again = training(params)
    assert again.reused == ["ingest", "clean", "train", "evaluate"]
    assert again.metrics == summary.metrics and again.model_version == summary.model_version


@pytest.mark.parametrize("family", ["random_forest", "linear"])
def test_each_family_runs_through_the_flagship_flow(prefect_api, tmp_path, family) -> None:
    from conveyor.flows.training import training

    params = PipelineParams(
        storage_url=(tmp_path / "store").as_uri(),
        max_rows=30_000,
        cluster="cpu",
        n_workers=2,
        training={"model": family, "random_forest": {"n_trees": 30}, "linear": {"max_iter": 60}},
    )
    state = training(params, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary.family == family and summary.promoted  # first model: the gate checks the baseline only
    assert summary.metrics["roc_auc"] > summary.baseline_metrics["roc_auc"]


def test_a_search_picks_a_winner_that_goes_through_the_gate(prefect_api, tmp_path) -> None:
    from conveyor.flows.training import training
    from conveyor.store.registry import read_card

    store_url = (tmp_path / "store").as_uri()
    common = {
        "storage_url": store_url,
        "max_rows": 30_000,
        "cluster": "cpu",
        "n_workers": 2,
        "training": {"num_boost_round": 60, "random_forest": {"n_trees": 20}, "linear": {"max_iter": 40}},
    }
    # A weaker champion first (a linear model), so the search's winner has to pass a real comparison.
    weak = training(
        PipelineParams(**common | {"training": common["training"] | {"model": "linear"}}), return_state=True
    )
    assert weak.is_completed() and weak.result().promoted
    state = training(PipelineParams(**common, search={"budget": 4, "seed": 3}), return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary.search["candidates"] == 4 and summary.search["parallelism"] == 2
    assert summary.champion_before == weak.result().model_version
    assert summary.champion_metrics is not None and summary.promoted, summary.gate_reason
    from conveyor.store.storage import Store

    card = read_card(Store.from_url(store_url), summary.model, summary.model_version)
    board = card["lineage"]["search"]["leaderboard"]
    assert (
        len(board) == 4 and board[0]["version"] == summary.model_version and card["family"] == summary.family
    )
    report = (tmp_path / "store" / "models" / summary.model / summary.model_version / "report.md").read_text()
    assert "Search: 4 candidates" in report and "baseline" in report
    runs = _task_runs(state.state_details.flow_run_id, set(STAGES))
    assert [r.name.split("-")[0] for r in runs if r.name.startswith("train")] == ["train"]


def test_bad_input_fails_fast_with_the_field_named(prefect_api, tmp_path, small_source) -> None:
    from conveyor.flows.training import training

    flights = pd.read_csv(small_source / "flights.csv", dtype=str, keep_default_na=False).drop(
        columns=["sched_dep_time"]
    )
    src = source_with(small_source, tmp_path / "src", flights)
    params = PipelineParams(
        storage_url=(tmp_path / "store").as_uri(), source_url=src.as_uri(), cluster="cpu", n_workers=1
    )
    state = training(params, return_state=True)

    assert state.is_failed()
    assert "field 'sched_dep_time'" in state.message or "sched_dep_time" in str(state.data)
    ingest_runs = [
        r for r in _task_runs(state.state_details.flow_run_id, {"ingest"}) if r.name.startswith("ingest")
    ]
    assert len(ingest_runs) == 1 and ingest_runs[0].run_count == 1  # validation errors are not retried


def test_params_reject_bad_values() -> None:
    with pytest.raises(ValueError, match="cluster"):
        PipelineParams(cluster="kubernetes")
    with pytest.raises(ValueError):
        PipelineParams(train_end="2013-13-01")
    with pytest.raises(ValueError, match="valid_end"):
        params = PipelineParams(train_end="2013-10-01", valid_end="2013-09-01")
        params.split_params(params.load_spec())
