"""The GPU path: dask-cuda cluster, XGBoost device="cuda".

The first tests pin GPU behaviour on any machine (the GPU count mocked); the
``gpu``-marked ones are skipped where NVML sees no CUDA device.
"""

from __future__ import annotations

import logging
import sys
import types

import pytest

from conveyor.cluster import cluster_kwargs, dask_cluster, resolve
from tests.support import allow_roots


def test_auto_picks_cpu_without_gpus(monkeypatch) -> None:
    monkeypatch.setattr("conveyor.cluster.gpu_count", lambda: 0)
    choice = resolve("auto")
    assert choice.kind == "cpu" and choice.n_workers >= 1
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve("gpu")


def test_auto_picks_one_worker_per_gpu(monkeypatch) -> None:
    monkeypatch.setattr("conveyor.cluster.gpu_count", lambda: 4)
    choice = resolve("auto")
    assert (choice.kind, choice.n_workers, choice.threads_per_worker) == ("gpu", 4, 1)
    assert resolve("tcp://scheduler:8786").address == "tcp://scheduler:8786"


@pytest.fixture
def no_rmm(monkeypatch):
    """A machine where ``import rmm`` fails, as with the lockfile (rmm is not in it)."""
    monkeypatch.setitem(sys.modules, "rmm", None)  # None in sys.modules: ImportError on import


def test_no_rmm_pool_is_asked_for_without_rmm(monkeypatch, no_rmm, caplog) -> None:
    monkeypatch.setattr("conveyor.cluster.gpu_count", lambda: 2)
    for cluster in ("auto", "gpu"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="conveyor.cluster"):
            kwargs = cluster_kwargs(resolve(cluster))
        assert "rmm_pool_size" not in kwargs and kwargs["n_workers"] == 2
        assert [r.getMessage() for r in caplog.records if "rmm" in r.getMessage()] == [
            "rmm is not installed: GPU workers run without an RMM memory pool (install rmm for one)"
        ]


def test_an_rmm_pool_is_asked_for_when_rmm_imports(monkeypatch, caplog) -> None:
    monkeypatch.setattr("conveyor.cluster.gpu_count", lambda: 1)
    monkeypatch.setitem(sys.modules, "rmm", types.ModuleType("rmm"))
    monkeypatch.setenv("CONVEYOR_RMM_POOL_SIZE", "30GB")
    with caplog.at_level(logging.WARNING, logger="conveyor.cluster"):
        assert cluster_kwargs(resolve("auto"))["rmm_pool_size"] == "30GB"
    assert not caplog.records


class _WorkersWouldStart(Exception):
    """Raised where dask-cuda's LocalCUDACluster hands over to LocalCluster to start GPU workers."""


def test_auto_with_a_gpu_and_no_rmm_passes_dask_cudas_own_checks(monkeypatch, no_rmm) -> None:
    """The real LocalCUDACluster constructor, fed what ``dask_cluster("auto")`` gives it, up to the point
    where it would start workers: dask-cuda 26.10 raises ``ValueError`` there if a pool is asked for
    without rmm (what ``conveyor run`` hit on the first GPU machine)."""
    import dask_cuda.local_cuda_cluster
    from distributed import LocalCluster

    def stop_before_workers(self, *args, **kwargs):
        raise _WorkersWouldStart(kwargs)

    monkeypatch.setattr("conveyor.cluster.gpu_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    # The two NVML reads before the RMM check: no NVML library on a CPU machine.
    monkeypatch.setattr(dask_cuda.local_cuda_cluster, "parse_device_memory_limit", lambda *a, **k: None)
    monkeypatch.setattr(LocalCluster, "__init__", stop_before_workers)
    with pytest.raises(_WorkersWouldStart), dask_cluster("auto"):
        pass


def test_xgb_params_follow_the_device() -> None:
    from conveyor.tasks.train import TrainParams, xgb_params

    assert xgb_params(TrainParams(), "cuda")["device"] == "cuda"
    assert xgb_params(TrainParams(), "cpu")["device"] == "cpu"
    assert xgb_params(TrainParams(), "cpu")["tree_method"] == "hist"


@pytest.mark.gpu
def test_train_on_local_cuda_cluster(pipeline_run, tmp_path) -> None:
    from dask_cuda import LocalCUDACluster
    from distributed import Client

    from conveyor.tasks import train

    with LocalCUDACluster(n_workers=1, dashboard_address=":0") as cluster, Client(cluster) as client:
        assert train.workers_have_gpus(client)
        result = train.train(
            pipeline_run.store,
            pipeline_run.cleaned,
            client,
            train.TrainParams(num_boost_round=200, seed=7),
            model="flights_late_gpu",
        )
    assert result.device == "cuda"
    assert result.valid_auc > 0.6


@pytest.mark.gpu
def test_search_puts_one_candidate_per_gpu(pipeline_run) -> None:
    """Every slot is one dask-cuda worker (one GPU); tree candidates train with device="cuda" on it."""
    from dask_cuda import LocalCUDACluster
    from distributed import Client

    from conveyor.tasks import search, train
    from conveyor.tasks.families import ForestParams, LinearParams

    base = train.TrainParams(
        num_boost_round=60, random_forest=ForestParams(n_trees=10), linear=LinearParams(max_iter=30)
    )
    with LocalCUDACluster(dashboard_address=":0") as cluster, Client(cluster) as client:
        gpus = len(client.scheduler_info(n_workers=-1)["workers"])
        result = search.run_search(
            pipeline_run.store,
            pipeline_run.cleaned,
            client,
            search.SearchParams(budget=3),
            base,
            model="flights_late_gpu_search",
        )
    assert result.search["device"] == "cuda" and result.search["parallelism"] == min(gpus, 3)
    assert len({c["slot"] for c in result.search["leaderboard"]}) == min(gpus, 3)


def test_cluster_cpu_trains_on_the_cpu_even_where_workers_see_a_gpu(
    prefect_api, tmp_path, monkeypatch
) -> None:
    """A GPU machine told ``cluster=cpu``: the LocalCluster workers still see the GPU through NVML."""
    import json

    from conveyor.flows.params import PipelineParams
    from conveyor.flows.training import training
    from conveyor.store.storage import Store
    from conveyor.tasks.train import load_booster

    allow_roots(monkeypatch, tmp_path)
    # Pickled by value to the workers: every worker of the CPU cluster reports one GPU.
    monkeypatch.setattr("conveyor.tasks.train.gpu_count", lambda: 1)
    monkeypatch.setattr("conveyor.cluster.gpu_count", lambda: 1)
    params = PipelineParams(
        storage_url=(tmp_path / "store").as_uri(),
        max_rows=20_000,
        cluster="cpu",
        n_workers=1,
        training={"num_boost_round": 20},
    )
    state = training(params, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary.device == "cpu"
    store = Store.from_url(params.storage_url)
    booster = load_booster(store, store.model_url(summary.model, summary.model_version))
    assert json.loads(booster.save_config())["learner"]["generic_param"]["device"] == "cpu"
