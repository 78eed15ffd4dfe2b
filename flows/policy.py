"""Retry, timeout and cache policy for every stage task: the one place to change them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from tasks.schema import InputError
from tasks.storage import StorageError


@dataclass(frozen=True)
class StagePolicy:
    """How one stage is retried and how long it may take.

    ``timeout_seconds`` is not handed to Prefect: for a sync task on a Dask
    worker thread Prefect's timeout cannot interrupt the work (it only warns).
    """

    retries: int
    timeout_seconds: float
    backoff_factor: float = 5.0
    jitter: float = 0.5


# Timeouts are generous for the flagship data on 2 cores; a hung stage still ends.
POLICIES: dict[str, StagePolicy] = {
    "ingest": StagePolicy(retries=3, timeout_seconds=3600),
    "clean": StagePolicy(retries=2, timeout_seconds=3600),
    "train": StagePolicy(retries=1, timeout_seconds=4 * 3600),
    "evaluate": StagePolicy(retries=2, timeout_seconds=3600),
    "deploy": StagePolicy(retries=3, timeout_seconds=600),
}

# Faults worth another try: I/O and network trouble, lost Dask workers.
TRANSIENT: tuple[type[BaseException], ...] = (OSError, TimeoutError, ConnectionError)
# Bad input or a broken invariant: retrying cannot help, fail at once with the message.
PERMANENT: tuple[type[BaseException], ...] = (InputError, StorageError, ValueError, TypeError, KeyError)


def is_transient(exc: BaseException) -> bool:
    from distributed import KilledWorker
    from distributed.comm.core import CommClosedError

    if isinstance(exc, PERMANENT) or isinstance(exc, (FileNotFoundError, PermissionError)):
        return False
    return isinstance(exc, (*TRANSIENT, KilledWorker, CommClosedError))


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry only faults that another attempt can fix."""
    try:
        state.result()
    except Exception as exc:  # the task's own exception, re-raised by result()
        return is_transient(exc)
    return False


def task_options(stage: str) -> dict[str, Any]:
    policy = POLICIES[stage]
    return {
        "name": stage,
        "retries": policy.retries,
        "retry_delay_seconds": exponential_backoff(backoff_factor=policy.backoff_factor),
        "retry_jitter_factor": policy.jitter,
        "retry_condition_fn": retry_transient,
        # Stages are idempotent by content version (tasks/storage.py); Prefect's own
        # input hashing would only add cost and warnings about unhashable inputs.
        "cache_policy": NO_CACHE,
        "tags": ["conveyor", f"stage:{stage}"],
    }
