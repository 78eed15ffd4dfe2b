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
    # The same workers and threads either way: the data is laid out alike, the model is the same.
    assert (small.n_workers, small.threads_per_worker) == (large.n_workers, large.threads_per_worker)


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
