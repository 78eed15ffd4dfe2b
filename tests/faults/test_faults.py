"""Fault injection: real faults against real parts, and what the pipeline does about each.

Storage faults go through an HTTP proxy in front of moto's S3 server (503
SlowDown, hangs); crashes are SIGKILLs of real processes (a stage process in
its manifest PUT or mid-boosting, a Dask worker mid-train); bad input is built
from the real flights. Each test records what it observed in the suite's
tally (tests/faults/conftest.py) before asserting, printed as the run's last
line; ``test_the_fault_line_shows_a_broken_recovery`` proves the line can
show a failure.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import pickle
import posixpath
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from conveyor.errors import InputError
from conveyor.policy import is_transient, task_options
from conveyor.store.storage import StorageError, Store, committed, open_manifest, read_dataset
from conveyor.tasks import clean, ingest, train
from conveyor.tasks.ingest import REASON
from tests.faults.tally import FaultLog, Tally, rows_in_storage
from tests.support import REPO_ROOT, source_with, wait_for

FAST = 0.1  # first retry delay in these tests (s)
S3_ROOT = "s3://conveyor-test/store"
S3_TIGHT_RETRIES = {"config_kwargs": {"retries": {"total_max_attempts": 2, "mode": "standard"}}}
HUNG_STAGE_TIMEOUT_S = 10
NO_LABEL = "arr_delay is missing: cancelled or diverted flight, no label"
LABEL = "is_late"  # the flights spec's label (pipelines/flights.yaml)


def _flights(source: Path) -> pd.DataFrame:
    return pd.read_csv(source / "flights.csv", dtype=str, keep_default_na=False)


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


def _ingest_kwargs(address: str, storage_url: str, source_url: str | None) -> dict:
    """The ingest task's arguments as the training flow passes them (the flagship spec, default params)."""
    from conveyor.flows.params import PipelineParams

    params = PipelineParams(storage_url=storage_url, source_url=source_url, cluster=address)
    return {
        "address": address,
        "storage_url": storage_url,
        "spec": params.load_spec(),
        "source_url": source_url,
        "params": params.ingest_params(),
    }


@contextlib.contextmanager
def _records_of(name: str):
    """ERROR records of one logger, seen by a handler on that logger itself (the root's handlers are
    Prefect's to reconfigure while a flow runs)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a process started with ``start_new_session=True`` and everything it started."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


# --- storage: S3 5xx, outages and a crash through the proxy ----------------------------------------


def test_s3_throttling_on_part_writes_is_absorbed(
    prefect_api, operator_allows, s3_proxy, small_source, dask_client, faults
) -> None:
    from conveyor.flows.training import ingest_task

    proxy, options = s3_proxy
    store = Store.from_url(S3_ROOT, options)
    faults.watch(store)
    fault = faults.inject("S3 503 SlowDown on part PUTs")
    rule = proxy.inject("PUT", r"/datasets/bronze_flights/.*/part-", "503", times=3)
    task, attempts = _counting(ingest_task, "ingest")
    state = _run_task(task, **_ingest_kwargs(dask_client.scheduler.address, S3_ROOT, small_source.as_uri()))

    fault.hit(rule.hits, f"the proxy served {rule.hits} 503s")
    written, read_back = len(_flights(small_source)), rows_in_storage(store, "bronze_flights")
    faults.rows(written, read_back)
    fault.recover(state.is_completed() and read_back == written)
    assert state.is_completed(), state.message
    assert rule.hits == 3  # every injected 503 was really served
    assert read_back == written == state.result().tables["flights"].rows_read


def test_manifest_outage_fails_after_retries_and_leaves_nothing_visible(
    prefect_api, operator_allows, s3_proxy, small_source, dask_client, monkeypatch, faults
) -> None:
    """S3 refuses the manifest PUT: the stage fails after its retries, no reader sees the parts; once S3
    is back the same run finishes the work."""
    from conveyor.flows.training import ingest_task

    proxy, options = s3_proxy
    options = options | S3_TIGHT_RETRIES
    monkeypatch.setenv("CONVEYOR_STORAGE_OPTIONS", json.dumps(options))
    store = Store.from_url(S3_ROOT, options)
    faults.watch(store)
    fault = faults.inject("S3 down for the manifest PUT")
    rule = proxy.inject("PUT", r"/datasets/bronze_flights/[^/]+/_manifest\.json", "503")
    task, attempts = _counting(ingest_task, "ingest")
    args = _ingest_kwargs(dask_client.scheduler.address, S3_ROOT, small_source.as_uri())
    state = _run_task(task, **args)
    fault.hit(rule.hits, f"the proxy refused {rule.hits} manifest PUTs")

    assert state.is_failed()
    with pytest.raises(OSError) as err:
        state.result()
    assert is_transient(err.value)  # S3 throttling: worth the retries it got
    assert len(attempts) == 4 and rule.hits >= 4
    [version_dir] = store.fs.ls("conveyor-test/store/datasets/bronze_flights")
    version = posixpath.basename(version_dir)
    assert store.fs.glob(f"{version_dir}/part-*.parquet")  # the parts were written ...
    assert committed(store, "bronze_flights", version) is None  # ... but no reader trusts them
    with pytest.raises(StorageError, match="no _manifest.json"):
        read_dataset(store, store.dataset_url("bronze_flights", version))

    proxy.clear()  # S3 is back: the same run again finishes the work
    task, attempts = _counting(ingest_task, "ingest")
    state = _run_task(task, **args)
    written, read_back = len(_flights(small_source)), rows_in_storage(store, "bronze_flights")
    faults.rows(written, read_back)
    fault.recover(state.is_completed() and read_back == written)
    assert state.is_completed() and len(attempts) == 1
    assert state.result().tables["flights"].bronze.version == version and read_back == written


CRASHING_INGEST = """
import sys
from distributed import Client
from conveyor.resources import open_store
from conveyor.tasks import ingest
if __name__ == "__main__":
    address, storage_url, source_url = sys.argv[1:4]
    with Client(address) as client:
        ingest.ingest(open_store(storage_url), client, source_url, ingest.IngestParams())
"""


def test_crash_between_parts_and_manifest_leaves_nothing_visible_then_recovers(
    tmp_path, s3_proxy, small_source, dask_client, faults
) -> None:
    """The ingest process is SIGKILLed while its manifest PUT is in flight (held by the proxy): its parts
    are on S3, no reader trusts them, and the rerun commits the same version."""
    proxy, options = s3_proxy
    store = Store.from_url(S3_ROOT, options)
    faults.watch(store)
    fault = faults.inject("SIGKILL of the ingest process between its parts and its manifest")
    rule = proxy.inject("PUT", r"/datasets/bronze_flights/[^/]+/_manifest\.json", "hang")
    log = open(tmp_path / "ingest.log", "wb")  # noqa: SIM115 (the child's output; closed below)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CRASHING_INGEST,
            dask_client.scheduler.address,
            S3_ROOT,
            small_source.as_uri(),
        ],
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for(lambda: rule.hits or proc.poll() is not None, "the manifest PUT", timeout=240)
        in_flight = rule.hits
        _kill_group(proc)
    finally:
        _kill_group(proc)
        log.close()
    output = (tmp_path / "ingest.log").read_text(errors="replace")
    proxy.clear()
    [version_dir] = store.fs.ls("conveyor-test/store/datasets/bronze_flights")
    version = posixpath.basename(version_dir)
    parts = store.fs.glob(f"{version_dir}/part-*.parquet")
    killed = proc.returncode == -signal.SIGKILL
    fault.hit(
        in_flight and killed and parts, f"pid {proc.pid} killed in its manifest PUT, {len(parts)} parts"
    )

    assert in_flight and killed, output[-3000:]
    assert parts and committed(store, "bronze_flights", version) is None  # written, not trusted
    # The rerun (a new process would do the same) commits the version the crashed run was writing.
    again = ingest.ingest(store, dask_client, small_source.as_uri())
    written, read_back = len(_flights(small_source)), rows_in_storage(store, "bronze_flights")
    faults.rows(written, read_back)
    fault.recover(again.tables["flights"].bronze.version == version and read_back == written)
    assert again.tables["flights"].bronze.version == version and not again.tables["flights"].reused
    assert read_back == written


# --- bad data at rest and at the door ---------------------------------------------------------


def test_corrupt_committed_parquet_part_is_refused_by_name(
    tmp_path, small_source, dask_client, faults
) -> None:
    store = Store.from_url(str(tmp_path / "store"))
    faults.watch(store)
    fault = faults.inject("torn committed parquet part")
    ingested = ingest.ingest(store, dask_client, small_source.as_uri())
    bronze = ingested.tables["flights"].bronze
    entry = open_manifest(store, bronze.url).files[0]
    part = posixpath.join(store.path(bronze.url), entry.path)
    with open(part, "r+b") as fh:  # a torn write: the tail of the file is gone
        fh.truncate(os.path.getsize(part) // 2)
    fault.hit(
        os.path.getsize(part) < entry.size, f"{entry.path} is {os.path.getsize(part)} of {entry.size} bytes"
    )

    try:
        clean.clean(store, ingested, dask_client)
        error: Exception | None = None
    except Exception as exc:
        error = exc
    named = isinstance(error, StorageError) and f"part {entry.path} is" in str(error)
    fault.recover(named and not is_transient(error))
    assert named, repr(error)
    assert re.search(r"part part-00000\.parquet is \d+ bytes, _manifest.json says \d+", str(error))
    assert not is_transient(error)


def test_corrupt_source_parquet_is_named(tmp_path, small_source, dask_client, faults) -> None:
    import pyarrow.parquet as pq

    src = source_with(small_source, tmp_path / "src", _flights(small_source))
    (src / "planes.csv").unlink()
    (src / "planes.parquet").write_bytes(b"PAR1" + os.urandom(512))
    fault = faults.inject("unreadable source parquet")
    try:
        pq.read_table(src / "planes.parquet")
    except Exception as exc:
        fault.hit(True, f"pyarrow cannot read it either: {type(exc).__name__}")
    with pytest.raises(InputError, match=r"planes.parquet: cannot read file") as err:
        ingest.ingest(Store.from_url(str(tmp_path / "store")), dask_client, src.as_uri())
    fault.recover(not is_transient(err.value))
    assert not is_transient(err.value)


def test_schema_drift_fails_once_with_the_field_named(
    prefect_api, operator_allows, tmp_path, small_source, dask_client, faults
) -> None:
    from conveyor.flows.training import ingest_task

    flights = _flights(small_source).rename(columns={"carrier": "airline"}).assign(gate="B12")
    src = source_with(small_source, tmp_path / "src", flights)
    faults.watch(Store.from_url((tmp_path / "store").as_uri()))
    fault = faults.inject("schema drift: a renamed column")
    header = (src / "flights.csv").read_text().splitlines()[0].split(",")
    fault.hit("carrier" not in header and "airline" in header, "the source header has airline, no carrier")
    task, attempts = _counting(ingest_task, "ingest")
    store_url = (tmp_path / "store").as_uri()
    state = _run_task(task, **_ingest_kwargs(dask_client.scheduler.address, store_url, src.as_uri()))

    message = str(state.message) + str(state.data)
    fault.recover(state.is_failed() and len(attempts) == 1 and "'carrier'" in message)
    assert state.is_failed() and len(attempts) == 1  # validation errors are not retried
    with pytest.raises(InputError, match=r"flights.csv: field 'carrier': required column is missing"):
        state.result()


def test_nan_labels_are_quarantined_and_no_row_is_lost(tmp_path, small_source, dask_client, faults) -> None:
    flights = _flights(small_source)
    had_no_label = int(flights["arr_delay"].isin(["", "NA"]).sum())
    hit = flights.index[~flights["arr_delay"].isin(["", "NA"])][:100]
    flights.loc[hit[:50], "arr_delay"] = "NA"
    flights.loc[hit[50:], "arr_delay"] = "NaN"
    src = source_with(small_source, tmp_path / "src", flights)
    store = Store.from_url(str(tmp_path / "store"))
    faults.watch(store)
    fault = faults.inject("100 labels made NaN")
    on_disk = _flights(src)["arr_delay"]
    fault.hit(
        int(on_disk.isin(["", "NA", "NaN"]).sum()) == had_no_label + 100, "100 more missing labels on disk"
    )

    ingested = ingest.ingest(store, dask_client, src.as_uri())
    cleaned = clean.clean(store, ingested, dask_client)
    # Read back from storage: silver and clean's quarantine, plus the rows ingest quarantined.
    read_back = rows_in_storage(store, "silver_flights") + rows_in_storage(
        store, "bronze_flights", kinds=("quarantine",)
    )
    faults.rows(len(flights), read_back)
    quarantined = pd.read_parquet(store.path(cleaned.quarantine.url), columns=[REASON])
    silver = read_dataset(store, cleaned.silver.url, columns=[LABEL]).compute()
    no_label = int((quarantined[REASON] == NO_LABEL).sum())
    fault.recover(no_label == had_no_label + 100 and bool(silver[LABEL].notna().all()))
    assert no_label == cleaned.quarantine_reasons[NO_LABEL] == had_no_label + 100
    assert silver[LABEL].notna().all()
    assert read_back == len(flights)


# --- a hung stage, and alerts that arrive (or are logged when they cannot) ------------------------


def test_hung_storage_times_out_the_stage_and_the_alert_arrives(
    prefect_api, operator_allows, s3_proxy, small_source, dask_client, receiver, monkeypatch, faults
) -> None:
    """Every S3 request for the source hangs: the ingest time limit stops the run, the failure alert names
    it; a second, dead destination is logged as not delivered. The limit leaves time to reach the hang
    on a loaded machine (the proxy's hit counter shows it was reached)."""
    import s3fs

    from conveyor.flows.params import PipelineParams
    from conveyor.flows.training import training
    from conveyor.prefect_api import free_port

    proxy, options = s3_proxy
    fs = s3fs.S3FileSystem(**options)
    for item in small_source.iterdir():
        fs.put_file(str(item), f"conveyor-test/src/{item.name}")
    faults.watch(Store.from_url(S3_ROOT, options))
    hang = faults.inject("every S3 request for the source hangs")
    dead_destination = faults.inject("a dead alert destination")
    # Object requests (/conveyor-test/src/...) and listings (/conveyor-test?...prefix=src...) alike.
    rule = proxy.inject("*", r"^/conveyor-test(/src|/?\?.*prefix=src)", "hang")
    url, received = receiver
    dead = f"http://127.0.0.1:{free_port()}/hook"
    monkeypatch.setenv("CONVEYOR_ALERT_WEBHOOKS", f"{url},{dead}")
    monkeypatch.setenv("CONVEYOR_ALERT_APPRISE", "")
    monkeypatch.setattr("conveyor.alerts.BACKOFF_S", 0.01)

    params = PipelineParams(
        storage_url=S3_ROOT,
        source_url="s3://conveyor-test/src",
        cluster=dask_client.scheduler.address,
        stage_timeouts={"ingest": HUNG_STAGE_TIMEOUT_S},
    )
    with _records_of("conveyor.alerts") as records:
        state = training(params, return_state=True)

    hang.hit(rule.hits, f"the proxy held {rule.hits} source requests")
    dead_id = hashlib.sha256(dead.encode()).hexdigest()[:8]
    logged = [r for r in records if "ALERT NOT DELIVERED" in r.getMessage() and dead_id in r.getMessage()]
    dead_destination.hit(logged, "ALERT NOT DELIVERED logged for it")
    faults.alerts(tried=2, delivered=len(received), failed=2 - len(received), failed_logged=len(logged))
    timed_out = (
        state.is_failed()
        and f"stage 'ingest' exceeded its timeout of {HUNG_STAGE_TIMEOUT_S} s" in str(state.message)
    )
    usable = dask_client.submit(sum, [1, 1], pure=False).result() == 2  # the cluster is still usable
    hang.recover(timed_out and usable)
    dead_destination.recover(len(received) == 1 and len(logged) == 1)  # the other alert still arrived

    assert rule.hits > 0  # the hang was really hit, not a timeout on a slow machine
    assert timed_out and usable, state.message
    run_id = str(state.state_details.flow_run_id)
    [alert] = received
    assert alert["kind"] == "flow.failed" and alert["details"]["stage"] == "ingest"
    assert alert["details"]["flow_run_id"] == run_id and alert["details"]["url"].endswith(
        f"/runs/flow-run/{run_id}"
    )
    assert "StageTimeout" in alert["details"]["error"] and alert["details"]["flow"] == "conveyor-training"
    assert len(logged) == 1  # the dead destination is loud, and changed nothing else


# --- crashes in training: a Dask worker, and the train stage process ------------------------------


def _training_keys(dask_worker) -> list[str]:
    # xgboost.dask runs one boosting task per worker, keyed after its wrapper ("fn-<id>" in xgboost 3.2).
    return [str(k) for k in dask_worker.active_threads.values() if str(k).startswith(("fn-", "do_train"))]


@pytest.mark.slow
def test_worker_killed_mid_train_is_retried_and_recovers(
    prefect_api, pipeline_run, dask_client, faults
) -> None:
    from conveyor.flows.training import train_task
    from conveyor.tasks.train import SplitParams, TrainParams

    params = TrainParams(num_boost_round=2000, learning_rate=0.01, early_stopping_rounds=2000, seed=99)
    killed: list[int] = []
    fault = faults.inject("SIGKILL of a Dask worker mid-boosting")

    def kill_one_worker_when_training() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                running = [w for w, keys in dask_client.run(_training_keys).items() if keys]
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
    fault.hit(killed, f"worker pid {killed} killed while boosting")
    result = state.result() if state.is_completed() else None
    # Recovered means a usable model, not just a completed task: a real validation score.
    fault.recover(result is not None and len(attempts) == 2 and 0.5 < result.valid_auc <= 1)

    assert killed, "no training task was seen on a worker"
    assert state.is_completed(), state.message
    assert len(attempts) == 2  # the lost worker cost one retry
    assert result.train_rows > 0 and 0.5 < result.valid_auc <= 1
    dask_client.wait_for_workers(2, timeout=120)  # the nanny brought the worker back


TRAIN_UNTIL_KILLED = """
import pickle, sys, threading, time
from pathlib import Path
from distributed import Client, LocalCluster
from conveyor.store.storage import Store
from conveyor.tasks import train


def mark_when_boosting(cluster, marker):
    # Observes only: writes the marker once the in-process worker runs xgboost.dask's training task.
    while True:
        for worker in list(cluster.workers.values()):
            keys = [str(k) for k in worker.active_threads.values()]
            if any(k.startswith(("fn-", "do_train")) for k in keys):
                marker.write_text(" ".join(keys))
                return
        time.sleep(0.02)

if __name__ == "__main__":
    root, cleaned_path, params_path, marker = sys.argv[1:5]
    cleaned = pickle.loads(Path(cleaned_path).read_bytes())
    params = pickle.loads(Path(params_path).read_bytes())
    # Workers are threads of this process: the SIGKILL ends the boosting itself, not just its client.
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            threading.Thread(target=mark_when_boosting, args=(cluster, Path(marker)), daemon=True).start()
            train.train(Store.from_url(root), cleaned, client, params)
    print("finished")
"""


@pytest.mark.slow
def test_train_stage_killed_mid_boosting_resumes_from_train(tmp_path, dask_client, faults) -> None:
    """A real train stage process (its Dask worker in-process) is SIGKILLed while boosting: no model looks
    finished, and the rerun reuses ingest and clean and trains once."""
    store = Store.from_url((tmp_path / "store").as_uri())
    faults.watch(store)
    ingested = ingest.ingest(store, dask_client, None, ingest.IngestParams(max_rows=20_000))
    cleaned = clean.clean(store, ingested, dask_client)
    params = train.TrainParams(num_boost_round=1000, learning_rate=0.01, early_stopping_rounds=1000, seed=5)
    (tmp_path / "cleaned.pkl").write_bytes(pickle.dumps(cleaned))
    (tmp_path / "params.pkl").write_bytes(pickle.dumps(params))
    marker = tmp_path / "boosting"
    fault = faults.inject("SIGKILL of the train stage process mid-boosting")
    log = open(tmp_path / "train.log", "wb")  # noqa: SIM115 (the child's output; closed below)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            TRAIN_UNTIL_KILLED,
            store.root,
            str(tmp_path / "cleaned.pkl"),
            str(tmp_path / "params.pkl"),
            str(marker),
        ],
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for(lambda: marker.exists() or proc.poll() is not None, "boosting to start", timeout=300)
        time.sleep(1.0)  # well into the boosting rounds
        boosting = marker.exists() and proc.poll() is None
        _kill_group(proc)
    finally:
        _kill_group(proc)
        log.close()
    output = (tmp_path / "train.log").read_text(errors="replace")
    killed = proc.returncode == -signal.SIGKILL
    finished = list((tmp_path / "store" / "models").glob("*/*/train.json"))
    fault.hit(
        boosting and killed, f"pid {proc.pid} killed while running {marker.read_text() if boosting else '-'}"
    )

    rerun_ingest = ingest.ingest(store, dask_client, None, ingest.IngestParams(max_rows=20_000))
    rerun_clean = clean.clean(store, rerun_ingest, dask_client)
    trained = train.train(store, rerun_clean, dask_client, params)
    fault.recover(
        not finished
        and rerun_ingest.reused
        and rerun_clean.reused
        and not trained.reused
        and train.committed_model(store, trained.model_url) is not None
    )
    assert boosting and killed, output[-3000:]
    assert not finished  # no model looks finished
    assert rerun_ingest.reused and rerun_clean.reused and not trained.reused
    assert train.committed_model(store, trained.model_url) is not None


# --- the tally itself ----------------------------------------------------------------------------


def test_the_fault_line_shows_a_broken_recovery(
    tmp_path, s3_proxy, small_source, dask_client, monkeypatch
) -> None:
    """A deliberately broken build, observed the way the suite observes: the ingest stage run without
    its retry policy through an S3 outage on part writes, a model folder whose train.json outlived an
    interrupted rewrite of its model, and an alert to a dead destination. The line computed from those
    observations says so."""
    import xgboost as xgb

    from conveyor.alerts import Alert, send_alert
    from conveyor.prefect_api import free_port

    proxy, options = s3_proxy
    broken = FaultLog()  # a private tally: these faults are not the suite's
    store = Store.from_url(S3_ROOT, options | S3_TIGHT_RETRIES)
    broken.watch(store)
    throttled = broken.inject("S3 refuses part PUTs for a while; the stage runs once, without its retries")
    rule = proxy.inject("PUT", r"/datasets/bronze_flights/.*/part-", "503")
    try:
        ingest.ingest(store, dask_client, small_source.as_uri())  # no Prefect task: no stage retry
        survived = True
    except Exception:
        survived = False
    throttled.hit(rule.hits, f"the proxy served {rule.hits} 503s")
    throttled.recover(survived)
    broken.rows(len(_flights(small_source)), rows_in_storage(store, "bronze_flights"))

    local = Store.from_url((tmp_path / "store").as_uri())
    broken.watch(local)
    stale = broken.inject("train.json kept while model.ubj was rewritten by another model")
    model_dir = Path(local.path(local.model_url("flights_late", "0123456789abcdef")))
    model_dir.mkdir(parents=True)
    data = xgb.DMatrix([[0.0], [1.0], [2.0], [3.0]], label=[0, 1, 0, 1])
    good = bytes(xgb.train({"max_depth": 2}, data, num_boost_round=3).save_raw("ubj"))
    other = bytes(xgb.train({"max_depth": 1}, data, num_boost_round=1).save_raw("ubj"))
    info = {
        "model_file": "model.ubj",
        "model_bytes": len(good),
        "model_sha256": hashlib.sha256(good).hexdigest(),
    }
    (model_dir / "train.json").write_text(json.dumps(info))
    (model_dir / "model.ubj").write_bytes(other)
    stale.hit(other != good, "model.ubj is not the model train.json describes")

    monkeypatch.setattr("conveyor.alerts.BACKOFF_S", 0.01)
    dead = f"http://127.0.0.1:{free_port()}/hook"
    deliveries = send_alert(
        Alert(kind="test", title="to nowhere", details={}), webhooks=[dead], apprise_urls=[]
    )
    broken.alerts(tried=1, delivered=sum(d.delivered for d in deliveries), failed=1, failed_logged=1)

    line = broken.finish().line()
    assert line.startswith(
        "faults injected 2 (confirmed hit 2), recovered 0/2, rows lost 5,000 of 5,000 written, "
        "partial objects visible 1 ("
    ), line
    assert "alerts delivered 0/1 (undelivered and logged 1/1)" in line, line
    assert Tally().line().startswith("faults injected 0 (confirmed hit 0), recovered 0/0, rows lost 0 of 0")
