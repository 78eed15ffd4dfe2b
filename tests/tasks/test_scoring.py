"""Batch scoring on the Dask cluster, and the monitor that rolls a misbehaving champion back."""

from __future__ import annotations

import posixpath

import numpy as np
import pandas as pd
import pytest

from conveyor.flows.model_monitor import MonitorParams, monitor_once
from conveyor.store.registry import CHAMPION, alias_history, read_alias, set_alias
from conveyor.store.storage import (
    MANIFEST,
    StorageError,
    commit_dataset,
    exists,
    open_manifest,
    read_dataset_pandas,
)
from conveyor.tasks.scoring import MODEL_VERSION, PREDICTION, PROBABILITY, encode_known, score_dataset
from conveyor.tasks.train import load_booster
from tests.support import MODEL, fresh_store, variant, wait_for

LABEL = "is_late"  # the flights spec's label (pipelines/flights.yaml)


@pytest.fixture
def registry(tmp_path, pipeline_run, dask_client):
    """Champion = the second model, promoted over the session's model (so there is one to roll back to)."""
    alt, _ = variant(pipeline_run, dask_client, "alt")
    first = pipeline_run.trained.version
    store = fresh_store(tmp_path / "store", pipeline_run, first, alt.version)
    set_alias(store, MODEL, CHAMPION, alt.version, "promoted for the test", expected=first, action="promote")
    return store, first, alt.version


def test_batch_scoring_writes_a_committed_predictions_dataset(registry, pipeline_run, dask_client) -> None:
    store, _, champion = registry
    silver = pipeline_run.cleaned.silver
    result = score_dataset(store, dask_client, silver.url, MODEL)

    assert result.model_version == champion and result.rows == silver.rows and not result.reused
    assert exists(
        store, posixpath.join(result.predictions.url, MANIFEST)
    )  # written last, so the version is complete
    manifest = open_manifest(store, result.predictions.url)
    assert manifest.lineage["model"] == {"name": MODEL, "version": champion}
    assert manifest.lineage["input"]["version"] == silver.version
    # Partition-parallel, but dask's planner fuses parts smaller than its minimum size (75 MB): small
    # inputs may score as one partition. Every row is scored either way.
    assert manifest.files and sum(f.rows for f in manifest.files) == silver.rows
    predictions = read_dataset_pandas(store, result.predictions.url)
    assert {PROBABILITY, PREDICTION, MODEL_VERSION, LABEL, "sched_dep"} <= set(predictions.columns)
    assert set(predictions[MODEL_VERSION]) == {champion}

    # The same probabilities as the booster called directly on the training encoding.
    card_features = pipeline_run.trained.features
    frame = read_dataset_pandas(pipeline_run.store, silver.url, columns=card_features)
    booster = load_booster(store, store.model_url(MODEL, champion))
    direct = booster.inplace_predict(encode_known(frame, pipeline_run.trained.categories)[card_features])
    np.testing.assert_allclose(predictions[PROBABILITY].to_numpy(), np.asarray(direct), rtol=1e-6, atol=1e-7)

    again = score_dataset(store, dask_client, silver.url, MODEL)
    assert again.reused and again.predictions.url == result.predictions.url


def test_scoring_data_without_a_feature_names_the_field(registry, pipeline_run, dask_client) -> None:
    store, _, _ = registry
    frame = read_dataset_pandas(pipeline_run.store, pipeline_run.cleaned.silver.url).drop(
        columns=["distance"]
    )
    url = store.dataset_url("no_distance", "v1")
    _write_parquet(store, url, frame.head(1000))
    commit_dataset(store, "no_distance", "v1", url, lineage={}, parallel=False)
    with pytest.raises(StorageError, match="distance"):
        score_dataset(store, dask_client, url, MODEL)


def _write_parquet(store, url: str, frame: pd.DataFrame) -> None:
    store.fs.makedirs(store.path(url), exist_ok=True)
    with store.fs.open(store.path(f"{url}/part-00000.parquet"), "wb") as fh:
        frame.to_parquet(fh, index=False)


def _labelled(store, pipeline_run, name: str, flip: bool) -> str:
    """Recent labelled flights (the holdout months); ``flip`` makes the world disagree with the model."""
    frame = read_dataset_pandas(pipeline_run.store, pipeline_run.cleaned.silver.url)
    frame = frame[frame["sched_dep"] >= pd.Timestamp("2013-10-01", tz="UTC")].copy()
    # Unseen categories in new data are scored as missing (and must not break scoring).
    frame.loc[frame.index[:50], "dest"] = "ZZZ"
    if flip:
        frame[LABEL] = (1 - frame[LABEL]).astype("int8")
    url = store.dataset_url(name, "v1")
    _write_parquet(store, url, frame)
    commit_dataset(store, name, "v1", url, lineage={"test": name}, parallel=False)
    return url


def test_monitor_keeps_a_healthy_champion(registry, pipeline_run, dask_client, alert_receiver) -> None:  # noqa: F811
    store, _, champion = registry
    replay = monitor_once(store, dask_client, MonitorParams(storage_url=store.root, max_auc_drop=0.02))
    assert not replay.check.breached and not replay.rolled_back
    assert replay.check.roc_auc == pytest.approx(
        replay.check.card_roc_auc, abs=1e-6
    )  # replay reproduces the card
    recent = _labelled(store, pipeline_run, "recent_ok", flip=False)
    outcome = monitor_once(store, dask_client, MonitorParams(storage_url=store.root, data_url=recent))
    assert not outcome.check.breached and outcome.check.rows > 1000
    assert read_alias(store, MODEL).version == champion and alert_receiver == []


def test_monitor_rolls_back_a_misbehaving_champion_and_alerts(
    registry, pipeline_run, dask_client, alert_receiver
) -> None:  # noqa: F811
    store, previous, champion = registry
    recent = _labelled(store, pipeline_run, "recent_drifted", flip=True)

    outcome = monitor_once(
        store, dask_client, MonitorParams(storage_url=store.root, data_url=recent, max_auc_drop=0.05)
    )

    assert outcome.check.breached and outcome.rolled_back and outcome.rolled_back_to == previous
    assert outcome.check.roc_auc < outcome.check.card_roc_auc - 0.05
    last = alias_history(store, MODEL)[-1]
    assert (last.action, last.previous, last.version, last.by) == (
        "rollback",
        champion,
        previous,
        "model-monitor",
    )
    [alert] = wait_for(
        lambda: [a for a in alert_receiver if a["kind"] == "model.rollback"], "the rollback alert"
    )
    assert alert["details"]["version"] == champion and alert["details"]["rolled_back_to"] == previous

    # The rolled-back model is now the one checked; with nothing older left, a breach only alerts.
    again = monitor_once(store, dask_client, MonitorParams(storage_url=store.root, data_url=recent))
    assert again.check.breached and not again.rolled_back and "rollback impossible" in again.note
    assert read_alias(store, MODEL).version == previous
    assert [a["kind"] for a in alert_receiver] == ["model.rollback", "monitor.threshold"]


def test_batch_scoring_flow_runs_on_its_own_cluster(prefect_api, registry, pipeline_run) -> None:
    from conveyor.flows.scoring import ScoringParams, batch_scoring

    store, _, champion = registry
    params = ScoringParams(
        input_url=pipeline_run.cleaned.silver.url,
        storage_url=store.root,
        cluster="cpu",
        n_workers=2,
        output_name="flow_predictions",
    )
    state = batch_scoring(params, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result.model_version == champion and result.rows == pipeline_run.cleaned.silver.rows
    assert result.predictions.url.startswith(store.url("datasets", "flow_predictions"))
