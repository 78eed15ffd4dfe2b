"""Which local cluster a run gets: in-process workers for small data under ``auto``, processes otherwise."""

from __future__ import annotations

import os

import pytest

from conveyor.cluster import (
    DEFAULT_THREADED_MAX_BYTES,
    THREADED_MAX_BYTES_ENV,
    ClusterChoice,
    cluster_kwargs,
    dask_cluster,
    resolve,
)


@pytest.fixture(autouse=True)
def _no_gpu(monkeypatch):
    monkeypatch.setattr("conveyor.cluster.gpu_count", lambda: 0)
    monkeypatch.delenv(THREADED_MAX_BYTES_ENV, raising=False)


def test_auto_picks_in_process_workers_for_small_data_only() -> None:
    small = resolve("auto", n_workers=2, data_bytes=40 * 2**20)
    large = resolve("auto", n_workers=2, data_bytes=DEFAULT_THREADED_MAX_BYTES + 1)
    unknown = resolve("auto", n_workers=2, data_bytes=None)
    assert not small.processes and large.processes and unknown.processes
    # The same workers either way: the data is laid out alike, the model is the same. In-process
    # workers may each use every core; processes split them.
    assert small.n_workers == large.n_workers
    cores = os.cpu_count() or 1
    assert small.threads_per_worker == cores
    assert large.threads_per_worker == max(1, cores // large.n_workers)


def test_an_explicit_cpu_cluster_keeps_worker_processes() -> None:
    assert resolve("cpu", n_workers=2, data_bytes=1).processes


def test_the_operator_sets_the_threshold_or_turns_it_off(monkeypatch) -> None:
    monkeypatch.setenv(THREADED_MAX_BYTES_ENV, "0")
    assert resolve("auto", data_bytes=1).processes
    monkeypatch.setenv(THREADED_MAX_BYTES_ENV, str(10 * 2**30))
    assert not resolve("auto", data_bytes=5 * 2**30).processes
    monkeypatch.setenv(THREADED_MAX_BYTES_ENV, "lots")
    with pytest.raises(ValueError, match=THREADED_MAX_BYTES_ENV):
        resolve("auto", data_bytes=1)


def test_in_process_workers_run_in_this_process_without_a_dashboard() -> None:
    from distributed import Client

    kwargs = cluster_kwargs(ClusterChoice("cpu", n_workers=2, threads_per_worker=1, processes=False))
    assert kwargs["processes"] is False and kwargs["dashboard_address"] is None
    with dask_cluster("auto", n_workers=2, data_bytes=1) as address, Client(address) as client:
        pids = client.run(os.getpid)
    assert len(pids) == 2 and set(pids.values()) == {os.getpid()}
    with dask_cluster("auto", n_workers=1, data_bytes=None) as address, Client(address) as client:
        assert set(client.run(os.getpid).values()) != {os.getpid()}


def test_the_source_is_sized_only_for_auto_and_never_waits_on_a_hung_store(monkeypatch) -> None:
    import threading
    import time

    from conveyor.flows import training
    from conveyor.flows.params import PipelineParams

    assert training.source_bytes(PipelineParams()) > 1_000_000  # the packaged flights data
    listed = threading.Event()

    def hung(*_args, **_kwargs):
        listed.set()
        time.sleep(30)

    monkeypatch.setattr(training.ingest_stage, "table_url", hung)
    assert training.source_bytes(PipelineParams(cluster="cpu")) is None and not listed.is_set()
    monkeypatch.setattr(training, "SIZING_TIMEOUT_S", 0.2)
    started = time.monotonic()
    assert training.source_bytes(PipelineParams()) is None and listed.is_set()
    assert time.monotonic() - started < 10  # bounded by the sizing limit, not by the hung call
