"""Fault injection: real faults against real parts, and what the pipeline does about each.

Storage faults go through an HTTP proxy in front of moto's S3 server (503
SlowDown, hangs); Dask faults kill real worker processes; bad input is built
from the real flights. Each test records its fault in the suite's tally
(tests/faults/conftest.py), printed as the run's last line.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import posixpath
import signal
import threading
import time

import pandas as pd
import pytest

from conveyor.errors import InputError
from conveyor.policy import is_transient, task_options
from conveyor.store.storage import MANIFEST, StorageError, Store, committed, open_manifest, read_dataset
from conveyor.tasks import clean, ingest
from conveyor.tasks.clean import LABEL
from tests.support import source_with

SMALL_ROWS = 5_000  # flights in small_source
FAST = 0.1  # first retry delay in these tests (s)


def _flights(source) -> pd.DataFrame:
    return pd.read_csv(source / "flights.csv", dtype=str, keep_default_na=False)


def visible_partials(store: Store) -> int:
    """Dataset versions a reader would accept (a manifest) whose parts are missing, resized or altered."""
    import hashlib

    fs = store.fs
    bad = 0
    for kind in ("datasets", "quarantine"):
        root = store.path(store.url(kind))
        for manifest_path in fs.glob(posixpath.join(root, "*", "*", MANIFEST)):
            base = posixpath.dirname(manifest_path)
            entries = json.loads(fs.cat_file(manifest_path))["files"]
            for entry in entries:
                path = posixpath.join(base, entry["path"])
                if not fs.exists(path) or hashlib.sha256(fs.cat_file(path)).hexdigest() != entry["sha256"]:
                    bad += 1
                    break
    return bad


def _run_task(task, *args, **kwargs):
    """Run one stage task (its real policy) inside a flow; its final state."""
    from prefect import flow

    states = []

    @flow
    def host() -> None:
        states.append(task(*args, return_state=True, **kwargs))

    host(return_state=True)
    return states[0]


def _counting(task, stage: str):
    """The stage task with fast retries, and a list counting its attempts."""
    attempts: list[int] = []
    original = task.fn

    @functools.wraps(original)
    def counted(*args, **kwargs):
        attempts.append(1)
        return original(*args, **kwargs)

    fast = task.with_options(**(task_options(stage, backoff_seconds=FAST) | {"name": task.name}))
    fast.fn = counted
    return fast, attempts


S3_TIGHT_RETRIES = {"config_kwargs": {"retries": {"total_max_attempts": 2, "mode": "standard"}}}


# --- storage: S3 5xx and outages through the proxy -------------------------------------------


def test_s3_throttling_on_part_writes_is_absorbed(
    prefect_api, s3_proxy, small_source, dask_client, faults
) -> None:
    from conveyor.flows.training import ingest_task

    proxy, options = s3_proxy
    rule = proxy.inject("PUT", r"/datasets/bronze_flights/.*/part-", "503", times=3)
    faults.injected()
    task, attempts = _counting(ingest_task, "ingest")
    state = _run_task(
        task,
        dask_client.scheduler.address,
        "s3://conveyor-test/store",
        small_source.as_uri(),
        ingest.IngestParams(),
    )

    assert state.is_completed(), state.message
    assert rule.hits == 3  # every injected 503 was really served
    result = state.result()
    flights = result.tables["flights"]
    assert flights.rows_read == SMALL_ROWS
    store = Store.from_url("s3://conveyor-test/store", options)
    assert visible_partials(store) == 0
    faults.rows_lost(SMALL_ROWS - flights.rows_read)
    faults.partial_visible(visible_partials(store))
    faults.recovered()


def test_crash_between_parts_and_manifest_leaves_nothing_visible_then_recovers(
    prefect_api, s3_proxy, small_source, dask_client, faults, monkeypatch
) -> None:
    """The manifest PUT fails (S3 down for it): the stage fails after its retries, no reader sees the
    parts."""
    from conveyor.flows.training import ingest_task

    proxy, options = s3_proxy
    options = options | S3_TIGHT_RETRIES
    monkeypatch.setenv("CONVEYOR_STORAGE_OPTIONS", json.dumps(options))
    rule = proxy.inject("PUT", r"/datasets/bronze_flights/[^/]+/_manifest\.json", "503")
    faults.injected()
    task, attempts = _counting(ingest_task, "ingest")
    args = (
        dask_client.scheduler.address,
        "s3://conveyor-test/store",
        small_source.as_uri(),
        ingest.IngestParams(),
    )
    state = _run_task(task, *args)

    assert state.is_failed()
    with pytest.raises(OSError) as err:
        state.result()
    assert is_transient(err.value)  # S3 throttling: worth the retries it got
    assert len(attempts) == 4 and rule.hits >= 4
    store = Store.from_url("s3://conveyor-test/store", options)
    [version_dir] = store.fs.ls("conveyor-test/store/datasets/bronze_flights")
    version = posixpath.basename(version_dir)
    assert store.fs.glob(f"{version_dir}/part-*.parquet")  # the parts were written ...
    assert committed(store, "bronze_flights", version) is None  # ... but no reader trusts them
    with pytest.raises(StorageError, match="no _manifest.json"):
        read_dataset(store, store.dataset_url("bronze_flights", version))
    assert visible_partials(store) == 0

    proxy.clear()  # S3 is back: the same run again finishes the work
    task, attempts = _counting(ingest_task, "ingest")
    state = _run_task(task, *args)
    assert state.is_completed() and len(attempts) == 1
    flights = state.result().tables["flights"]
    assert flights.rows_read == SMALL_ROWS and flights.bronze.version == version
    faults.rows_lost(SMALL_ROWS - flights.rows_read)
    faults.partial_visible(visible_partials(store))
    faults.recovered()


# --- bad data at rest and at the door ---------------------------------------------------------


def test_corrupt_committed_parquet_part_is_refused_by_name(
    tmp_path, small_source, dask_client, faults
) -> None:
    store = Store.from_url(str(tmp_path / "store"))
    ingested = ingest.ingest(store, dask_client, small_source.as_uri())
    bronze = ingested.tables["flights"].bronze
    part = posixpath.join(store.path(bronze.url), open_manifest(store, bronze.url).files[0].path)
    with open(part, "r+b") as fh:  # a torn write: the tail of the file is gone
        fh.truncate(os.path.getsize(part) // 2)
    faults.injected()

    with pytest.raises(
        StorageError, match=r"part part-00000\.parquet is \d+ bytes, _manifest.json says \d+"
    ) as err:
        clean.clean(store, ingested, dask_client)
    assert not is_transient(err.value)
    faults.partial_visible(0 if visible_partials(store) == 1 else 1)  # the torn part is caught, not served
    faults.recovered()


def test_corrupt_source_parquet_is_named(tmp_path, small_source, dask_client, faults) -> None:
    src = source_with(small_source, tmp_path / "src", _flights(small_source))
    (src / "planes.csv").unlink()
    (src / "planes.parquet").write_bytes(b"PAR1" + os.urandom(512))
    faults.injected()
    with pytest.raises(InputError, match=r"planes.parquet: cannot read file") as err:
        ingest.ingest(Store.from_url(str(tmp_path / "store")), dask_client, src.as_uri())
    assert not is_transient(err.value)
    faults.recovered()


def test_schema_drift_fails_once_with_the_field_named(
    prefect_api, tmp_path, small_source, dask_client, faults
) -> None:
    from conveyor.flows.training import ingest_task

    flights = _flights(small_source).rename(columns={"carrier": "airline"}).assign(gate="B12")
    src = source_with(small_source, tmp_path / "src", flights)
    faults.injected()
    task, attempts = _counting(ingest_task, "ingest")
    state = _run_task(
        task,
        dask_client.scheduler.address,
        (tmp_path / "store").as_uri(),
        src.as_uri(),
        ingest.IngestParams(),
    )

    assert state.is_failed() and len(attempts) == 1  # validation errors are not retried
    with pytest.raises(InputError, match=r"flights.csv: field 'carrier': required column is missing"):
        state.result()
    faults.recovered()


def test_nan_labels_are_quarantined_and_no_row_is_lost(tmp_path, small_source, dask_client, faults) -> None:
    flights = _flights(small_source)
    had_no_label = int(flights["arr_delay"].isin(["", "NA"]).sum())
    hit = flights.index[~flights["arr_delay"].isin(["", "NA"])][:100]
    flights.loc[hit[:50], "arr_delay"] = "NA"
    flights.loc[hit[50:], "arr_delay"] = "NaN"
    src = source_with(small_source, tmp_path / "src", flights)
    store = Store.from_url(str(tmp_path / "store"))
    faults.injected()

    ingested = ingest.ingest(store, dask_client, src.as_uri())
    cleaned = clean.clean(store, ingested, dask_client)
    reasons = cleaned.quarantine_reasons
    no_label = "arr_delay is missing: cancelled or diverted flight, no label"
    assert reasons[no_label] == had_no_label + 100
    bronze = ingested.tables["flights"]
    assert bronze.rows_read == SMALL_ROWS
    assert cleaned.rows_in == cleaned.silver.rows + cleaned.quarantine.rows
    silver = read_dataset(store, cleaned.silver.url, columns=[LABEL]).compute()
    assert silver[LABEL].notna().all()
    lost = SMALL_ROWS - (
        cleaned.silver.rows + cleaned.quarantine.rows + ingested.tables["flights"].quarantine.rows
    )
    assert lost == 0
    faults.rows_lost(lost)
    faults.partial_visible(visible_partials(store))
    faults.recovered()


# --- a hung stage, and alerts that arrive (or are logged when they cannot) ------------------------


def test_hung_storage_times_out_the_stage_and_the_alert_arrives(
    prefect_api, s3_proxy, small_source, dask_client, receiver, faults, monkeypatch, caplog
) -> None:
    """Every S3 request for the source hangs: the 2 s ingest limit stops the run, the failure alert names
    it."""
    import s3fs

    from conveyor.flows.params import PipelineParams
    from conveyor.flows.training import training
    from conveyor.prefect_api import free_port

    proxy, options = s3_proxy
    fs = s3fs.S3FileSystem(**options)
    for item in small_source.iterdir():
        fs.put_file(str(item), f"conveyor-test/src/{item.name}")
    proxy.inject("*", r"/conveyor-test/src", "hang")
    url, received = receiver
    dead = f"http://127.0.0.1:{free_port()}/hook"
    monkeypatch.setenv("CONVEYOR_ALERT_WEBHOOKS", f"{url},{dead}")
    monkeypatch.setenv("CONVEYOR_ALERT_APPRISE", "")
    monkeypatch.setattr("conveyor.alerts.BACKOFF_S", 0.01)
    faults.injected(2)  # the hang, and a dead alert destination

    params = PipelineParams(
        storage_url="s3://conveyor-test/store",
        source_url="s3://conveyor-test/src",
        cluster=dask_client.scheduler.address,
        stage_timeouts={"ingest": 2},
    )
    with caplog.at_level(logging.ERROR, logger="conveyor.alerts"):
        state = training(params, return_state=True)

    assert state.is_failed()
    assert "stage 'ingest' exceeded its timeout of 2 s" in state.message
    run_id = str(state.state_details.flow_run_id)
    [alert] = received
    assert alert["kind"] == "flow.failed" and alert["details"]["stage"] == "ingest"
    assert alert["details"]["flow_run_id"] == run_id and alert["details"]["url"].endswith(
        f"/runs/flow-run/{run_id}"
    )
    assert "StageTimeout" in alert["details"]["error"] and alert["details"]["flow"] == "conveyor-training"
    assert "ALERT NOT DELIVERED" in caplog.text  # the dead destination is loud, and changed nothing else
    assert dask_client.submit(sum, [1, 1], pure=False).result() == 2  # the cluster is still usable
    faults.alerts(sent=1, delivered=len(received))
    faults.recovered(2)


# --- a Dask worker killed mid-train -----------------------------------------------------------


@pytest.mark.slow
def test_worker_killed_mid_train_is_retried_and_recovers(
    prefect_api, pipeline_run, dask_client, faults
) -> None:
    from conveyor.flows.training import train_task
    from conveyor.tasks.train import SplitParams, TrainParams

    params = TrainParams(num_boost_round=2000, learning_rate=0.01, early_stopping_rounds=2000, seed=99)
    killed: list[int] = []

    def training_keys(dask_worker) -> list[str]:
        # xgboost.dask runs one boosting task per worker, keyed after its wrapper ("fn-<id>" in xgboost 3.2).
        return [str(k) for k in dask_worker.active_threads.values() if str(k).startswith(("fn-", "do_train"))]

    def kill_one_worker_when_training() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                running = [w for w, keys in dask_client.run(training_keys).items() if keys]
            except Exception:
                running = []
            if len(running) == 2:  # both workers are boosting: the collective is up
                time.sleep(1.0)
                pid = dask_client.run(os.getpid, workers=[running[0]])[running[0]]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_one_worker_when_training, daemon=True)
    killer.start()
    faults.injected()
    task, attempts = _counting(train_task, "train")
    state = _run_task(
        task,
        dask_client.scheduler.address,
        pipeline_run.store.root,
        pipeline_run.cleaned,
        params,
        SplitParams(),
        "flights_late_faults",
    )
    killer.join(timeout=10)

    assert killed, "no training task was seen on a worker"
    assert state.is_completed(), state.message
    assert len(attempts) == 2  # the lost worker cost one retry
    result = state.result()
    assert result.train_rows > 0 and 0.5 < result.valid_auc <= 1
    dask_client.wait_for_workers(2, timeout=120)  # the nanny brought the worker back
    faults.recovered()
