"""Choose the Dask cluster at the edge: a local CPU cluster, a dask-cuda GPU cluster, or an address."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from conveyor.resources import gpu_count

logger = logging.getLogger(__name__)


def quiet_dask_logs() -> None:
    """P2P shuffles log every start and stop at WARNING; that is progress, not a problem."""
    logging.getLogger("distributed.shuffle._scheduler_plugin").setLevel(logging.ERROR)


def _rmm_pool_size() -> float | str:
    raw = os.environ.get("CONVEYOR_RMM_POOL_SIZE", "0.8")
    try:
        return float(raw)  # a fraction of each GPU's memory
    except ValueError:
        return raw  # "30GB"


def rmm_available() -> bool:
    """Whether ``rmm`` imports here: dask-cuda refuses a pool without it (``ValueError``)."""
    try:
        import rmm  # noqa: F401
    except ImportError:
        return False
    return True


def _rmm_options() -> dict[str, Any]:
    """An RMM pool per GPU worker when rmm is installed; else none, said once (the lockfile has no rmm)."""
    if rmm_available():
        return {"rmm_pool_size": _rmm_pool_size()}
    logger.warning("rmm is not installed: GPU workers run without an RMM memory pool (install rmm for one)")
    return {}


THREADED_MAX_BYTES_ENV = "CONVEYOR_THREADED_CLUSTER_MAX_BYTES"
DEFAULT_THREADED_MAX_BYTES = 64 * 2**20


def threaded_max_bytes() -> int:
    """Source data up to this size runs on in-process (threaded) workers under ``cluster=auto``.

    Measured on the flagship (11 MB of compressed CSV, 337k rows, 2 cores): stages 12.6 s on two
    threaded workers against 15.7 s on two worker processes, the same model (holdout AUC 0.6886 both),
    and no worker processes to start. Worker processes stay the choice for larger data: they can be
    restarted when a stage times out, each has its own memory limit, and pure-Python work does not
    share one GIL. 64 MiB keeps a few million rows of parquet in-process and the 10M-row benchmarks on
    processes. ``0`` turns threaded workers off.
    """
    raw = os.environ.get(THREADED_MAX_BYTES_ENV, "").strip()
    if not raw:
        return DEFAULT_THREADED_MAX_BYTES
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{THREADED_MAX_BYTES_ENV} must be a whole number of bytes, not {raw!r}") from None
    return max(0, value)


@dataclass(frozen=True)
class ClusterChoice:
    kind: str  # "cpu", "gpu" or "address"
    address: str | None = None
    n_workers: int | None = None
    threads_per_worker: int | None = None
    processes: bool = True  # a CPU cluster's workers: processes, or threads of this process

    def describe(self) -> str:
        if self.kind == "address":
            return f"the cluster at {self.address}"
        where = "worker processes" if self.processes or self.kind == "gpu" else "in-process workers"
        return f"a local {self.kind.upper()} cluster of {self.n_workers} {where}"


def resolve(cluster: str, n_workers: int | None = None, data_bytes: int | None = None) -> ClusterChoice:
    """The cluster to use; ``data_bytes`` (the run's source size, when known) lets ``auto`` pick
    in-process workers for small data on a CPU machine."""
    if "://" in cluster:
        return ClusterChoice("address", address=cluster)
    if cluster not in {"auto", "cpu", "gpu"}:
        raise ValueError(f"cluster must be auto, cpu, gpu or tcp://host:port, not {cluster!r}")
    gpus = gpu_count() if cluster in {"auto", "gpu"} else 0
    if cluster == "gpu" and gpus == 0:
        raise ValueError("cluster=gpu but no CUDA device is visible (NVML found none)")
    if gpus:
        return ClusterChoice("gpu", n_workers=n_workers or gpus, threads_per_worker=1)
    cores = os.cpu_count() or 1
    workers = n_workers or max(1, min(4, cores // 2 if cores >= 4 else cores))
    small = cluster == "auto" and data_bytes is not None and data_bytes <= threaded_max_bytes()
    # In-process workers share the process's cores and its GIL: each may use all of them (XGBoost's
    # threads of one worker run while the other's wait in the collective allreduce: a first run's
    # stages 0.4 s faster on 2 cores, the same model). Processes split the cores between them.
    threads = cores if small else max(1, cores // workers)
    return ClusterChoice("cpu", n_workers=workers, threads_per_worker=threads, processes=not small)


def cluster_kwargs(choice: ClusterChoice) -> dict[str, Any]:
    common = {
        "dashboard_address": "127.0.0.1:0",  # loopback: the dashboard is not for the network
        "n_workers": choice.n_workers,
        "threads_per_worker": choice.threads_per_worker,
    }
    if choice.kind == "gpu":
        # One worker per GPU, an RMM pool where rmm is installed, no cuDF spilling.
        return common | _rmm_options() | {"enable_cudf_spill": False}
    if not choice.processes:
        # Same workers and threads as processes would have (the same data layout, the same model),
        # no dashboard: nothing to start but the scheduler.
        return common | {"processes": False, "dashboard_address": None}
    return common | {"processes": True}


@contextmanager
def dask_cluster(cluster: str, n_workers: int | None = None, data_bytes: int | None = None) -> Iterator[str]:
    """Yield a scheduler address: the given one, or a local CPU/GPU cluster closed on exit.

    The flow owns the cluster and hands stage tasks its address. Stage tasks run
    on Prefect's thread runner in the flow process, so Dask workers never need
    the Prefect API; measured faster than ``DaskTaskRunner`` (see DESIGN.md).
    """
    choice = resolve(cluster, n_workers, data_bytes)
    logger.debug("dask cluster: %s", choice.describe())
    if choice.kind == "address":
        yield str(choice.address)
        return
    if choice.kind == "gpu":
        from dask_cuda import LocalCUDACluster

        local = LocalCUDACluster(**cluster_kwargs(choice))
    else:
        from distributed import LocalCluster

        local = LocalCluster(**cluster_kwargs(choice))
    with local:
        yield local.scheduler_address
