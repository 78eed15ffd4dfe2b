"""The flagship flow on s3:// (moto server) gives the local results; a run killed in train resumes there."""

from __future__ import annotations

import json

import pytest

from conveyor.flows.params import PipelineParams, TrainingOptions
from tests.support import REPO_ROOT, SAMPLE_ROWS

ROOT = REPO_ROOT


@pytest.mark.slow
def test_flow_on_s3_matches_the_local_run(prefect_api, pipeline_run, s3_options, monkeypatch) -> None:
    from conveyor.flows.training import training

    monkeypatch.setenv("CONVEYOR_STORAGE_OPTIONS", json.dumps(s3_options))
    params = PipelineParams(
        storage_url="s3://conveyor-test/flights",
        max_rows=SAMPLE_ROWS,
        cluster="cpu",
        n_workers=2,
        training=TrainingOptions(num_boost_round=200),
    )
    summary = training(params)

    # Same inputs, params and code: the same content versions and the same model as on local disk.
    assert summary.datasets["silver_flights"]["version"] == pipeline_run.cleaned.silver.version
    assert summary.datasets["silver_flights"]["rows"] == pipeline_run.cleaned.silver.rows
    assert summary.model_version == pipeline_run.trained.version
    assert summary.metrics["roc_auc"] == pytest.approx(pipeline_run.evaluation.metrics.roc_auc, abs=1e-9)
    assert summary.storage_url == "s3://conveyor-test/flights"

    from conveyor.store.maintenance import verify
    from conveyor.store.storage import Store

    report = verify(Store.from_url("s3://conveyor-test/flights", s3_options))
    assert report.ok and report.checked >= 13

    # Rerun with unchanged inputs: every stage with a committed output is skipped, the evaluation too.
    again = training(params)
    assert again.reused == ["ingest", "clean", "train", "evaluate"]
    assert again.model_version == summary.model_version
