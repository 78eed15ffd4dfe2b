"""The flagship flow on s3:// (moto server) gives the local results; a run killed in train resumes there."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

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

    # Rerun with unchanged inputs: every stage with a committed output is skipped.
    again = training(params)
    assert again.reused == ["ingest", "clean", "train"]
    assert again.model_version == summary.model_version


@pytest.mark.slow
def test_run_killed_during_train_resumes_from_train(prefect_api, tmp_path, dask_client) -> None:
    """SIGKILL inside xgboost training; the rerun reuses ingest and clean and trains once."""
    from conveyor.flows.training import training

    storage = (tmp_path / "store").as_uri()
    script = textwrap.dedent(f"""
        import os, signal
        import xgboost.dask
        from distributed import Client
        from conveyor.tasks import clean, ingest, train
        from conveyor.store.storage import Store
        def die(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        xgboost.dask.train = die
        if __name__ == "__main__":
            store = Store.from_url({storage!r})
            with Client({dask_client.scheduler.address!r}) as client:
                ingested = ingest.ingest(store, client, None, ingest.IngestParams(max_rows=20_000))
                cleaned = clean.clean(store, ingested, client)
                train.train(store, cleaned, client)
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not list((tmp_path / "store" / "models").glob("*/*/train.json"))  # no model looks finished

    summary = training(PipelineParams(storage_url=storage, max_rows=20_000, cluster="cpu", n_workers=2))
    assert summary.reused == ["ingest", "clean"]
    assert (tmp_path / "store" / "models" / summary.model / summary.model_version / "train.json").exists()
