"""The GPU path: dask-cuda cluster, XGBoost device="cuda". Skipped where NVML sees no CUDA device."""

from __future__ import annotations

import pytest

from conveyor.cluster import resolve


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
