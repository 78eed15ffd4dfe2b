"""Retry, timeout and cache policy for every stage task: the one place to change them.

Retries: Prefect's own (``retries``, ``retry_delay_seconds`` with exponential
backoff, ``retry_jitter_factor``), gated by :func:`retry_transient` so only
faults another attempt can fix are retried. Measured in tests/test_policy.py:
prefect 3.8 calls ``retry_condition_fn`` only when it is a plain function
(``inspect.isfunction``); any other callable is read as "never retry".

Timeouts: not Prefect's. A sync task on the thread runner cannot be interrupted
by Prefect's timeout (it only warns), so :func:`run_stage` runs the stage body
in a thread it can abandon, and on expiry cancels the stage's Dask work,
restarts workers still busy with it (only on a cluster the flow owns), and
closes the stage's client, so the blocked body fails fast and the cluster is
free for the next run.
"""

from __future__ import annotations

import contextvars
import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from conveyor import quiet
from conveyor.errors import InputError
from conveyor.store.storage import StorageError

T = TypeVar("T")
logger = logging.getLogger("conveyor.policy")

# Every flow imports this module before it runs, also in a flow-run process a Prefect worker started (no
# CLI there): a user error is logged as its one line, library chatter is filtered (conveyor.quiet).
quiet.install()

STAGES = ("ingest", "clean", "train", "evaluate", "deploy", "monitor")

# Stages that put work on the GPUs when the flow's cluster has them. Their task runs carry
# GPU_TAG; the Prefect tag concurrency limit on it (``ensure_gpu_limit``, set to the number
# of GPUs) caps how many GPU stages run at once across every flow on the server.
GPU_TAG = "conveyor-gpu"
GPU_STAGES = ("clean", "train", "evaluate")


@dataclass(frozen=True)
class StagePolicy:
    """How one stage is retried and how long it may take.

    ``backoff_factor`` is the first retry delay in seconds, doubled for each
    further retry; ``jitter`` spreads each delay up to ``(1 + jitter)`` times
    its nominal value (Prefect's clamped Poisson interval, same mean).
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
    "monitor": StagePolicy(retries=1, timeout_seconds=900),
    "score": StagePolicy(retries=2, timeout_seconds=3600),
    "replicate": StagePolicy(retries=3, timeout_seconds=3600),
}

# Bad input or a broken invariant: retrying cannot help, fail at once with the message.
PERMANENT: tuple[type[BaseException], ...] = (
    InputError,
    StorageError,
    ValueError,
    TypeError,
    KeyError,
    AttributeError,
    AssertionError,
    NotImplementedError,
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)
# OSErrors whose errno says "your request is wrong", not "the line is bad" (s3fs maps S3 codes to these).
PERMANENT_ERRNOS = frozenset(
    {
        errno.EINVAL,
        errno.EPERM,
        errno.EACCES,
        errno.ENOENT,
        errno.EEXIST,
        errno.ENOTEMPTY,
        errno.ENAMETOOLONG,
        errno.EMSGSIZE,
        errno.ENOSYS,
        errno.EISDIR,
        errno.ENOTDIR,
    }
)
# S3 error codes worth another attempt (throttling and server-side trouble).
TRANSIENT_S3_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "503",
        "500",
        "502",
        "504",
    }
)
# xgboost's collective reports a lost peer as an XGBoostError (a ValueError): these messages mean a worker
# went away.
LOST_PEER_HINTS = (
    "connection reset",
    "connection closed",
    "broken pipe",
    "socket",
    "timed out",
    "worker",
    "commclosed",
    "killed",
    "peer",
)


class StageTimeout(TimeoutError):
    """A stage ran past its limit and was stopped; it is not retried (the limit is the stage's budget)."""

    def __init__(self, stage: str, limit: float, detail: str = ""):
        self.stage = stage
        self.limit = limit
        extra = f"; {detail}" if detail else ""
        super().__init__(f"stage '{stage}' exceeded its timeout of {limit:g} s and was stopped{extra}")


def _transient_one(exc: BaseException) -> bool | None:
    """True / False when ``exc`` alone decides; None when it says nothing (look at its cause)."""
    from distributed import KilledWorker
    from distributed.comm.core import CommClosedError

    if isinstance(exc, StageTimeout):
        return False
    if isinstance(exc, (KilledWorker, CommClosedError, ConnectionError)):
        return True
    name = type(exc).__name__
    if name == "XGBoostError":
        return any(hint in str(exc).lower() for hint in LOST_PEER_HINTS)
    response = getattr(exc, "response", None)  # botocore ClientError
    if isinstance(response, Mapping):
        code = str(response.get("Error", {}).get("Code", ""))
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return code in TRANSIENT_S3_CODES or status >= 500 or status == 429
    if type(exc).__module__.startswith("botocore") and any(
        k in name for k in ("Connection", "Timeout", "Endpoint", "ResponseStreaming", "IncompleteRead")
    ):
        return True
    if isinstance(exc, PERMANENT):
        return False
    if isinstance(exc, OSError):  # TimeoutError, socket errors, s3fs' EBUSY / EREMOTEIO for 503 / SlowDown
        return exc.errno not in PERMANENT_ERRNOS
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether another attempt can fix ``exc``: I/O trouble, S3 5xx / throttling, lost Dask workers.

    Follows ``__cause__`` / ``__context__`` so a fault re-raised by a library still counts.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        verdict = _transient_one(current)
        if verdict is not None:
            return verdict
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return False


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry only faults that another attempt can fix.

    Must stay a plain function: prefect ignores (never retries) a callable object here.
    """
    try:
        state.result()
    except Exception as exc:  # the task's own exception, re-raised by result()
        transient = is_transient(exc)
        logger.info(
            "%s: %s: %s",
            task.name,
            "transient, retrying" if transient else "permanent, not retried",
            f"{type(exc).__name__}: {exc}"[:300],
        )
        return transient
    return False


def env_override(stage: str, what: str) -> float | None:
    """``CONVEYOR_<WHAT>_<STAGE>`` (e.g. ``CONVEYOR_TIMEOUT_TRAIN=2``) or ``CONVEYOR_<WHAT>`` for every
    stage."""
    for name in (f"CONVEYOR_{what}_{stage}".upper(), f"CONVEYOR_{what}".upper()):
        raw = os.environ.get(name, "").strip()
        if raw:
            try:
                return float(raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not a number of seconds") from None
    return None


def policy_for(
    stage: str, timeouts: Mapping[str, float] | None = None, backoff_seconds: float | None = None
) -> StagePolicy:
    """The stage's policy with overrides applied: parameters first, then the environment, then the
    defaults."""
    if stage not in POLICIES:
        raise KeyError(f"no policy for stage {stage!r}; known: {', '.join(POLICIES)}")
    policy = POLICIES[stage]
    timeout = (timeouts or {}).get(stage)
    timeout = timeout if timeout is not None else env_override(stage, "timeout")
    backoff = backoff_seconds if backoff_seconds is not None else env_override(stage, "retry_backoff")
    if timeout is not None:
        policy = replace(policy, timeout_seconds=float(timeout))
    if backoff is not None:
        policy = replace(policy, backoff_factor=float(backoff))
    return policy


def task_options(
    stage: str,
    timeouts: Mapping[str, float] | None = None,
    backoff_seconds: float | None = None,
    gpu: bool = False,
) -> dict[str, Any]:
    """Keyword arguments for ``@task`` / ``Task.with_options`` of one stage (``gpu``: the cluster has
    GPUs)."""
    policy = policy_for(stage, timeouts, backoff_seconds)
    return {
        "name": stage,
        "retries": policy.retries,
        "retry_delay_seconds": exponential_backoff(backoff_factor=policy.backoff_factor),
        "retry_jitter_factor": policy.jitter,
        "retry_condition_fn": retry_transient,
        # Stages are idempotent by content version (conveyor/store/storage.py); Prefect's own
        # input hashing would only add cost and warnings about unhashable inputs.
        "cache_policy": NO_CACHE,
        # No tag on CPU stages: for every tagged task run Prefect's task engine asks the API for
        # concurrency slots (an increment-with-lease write; 3.8.8, task_engine.start). On the local
        # SQLite server that write can get a 503 and a 2-second client retry: measured 1.8 s of a
        # 2-second stall before evaluate on a first run. GPU stages carry GPU_TAG, whose limit is the
        # number of GPUs. The task's name already says the stage.
        "tags": [GPU_TAG] if gpu and stage in GPU_STAGES else [],
    }


def ensure_gpu_limit(gpus: int | None = None) -> int | None:
    """Set the Prefect concurrency limit of GPU_TAG to the number of GPUs (NVML's count by default).

    Idempotent: an existing limit is updated to the count. With no GPU nothing is
    created (CPU stages never carry the tag). Returns the limit set, or None.
    """
    from prefect.client.orchestration import get_client

    if gpus is None:
        from conveyor.resources import gpu_count

        gpus = gpu_count()
    if gpus <= 0:
        return None
    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(
            tag=GPU_TAG, concurrency_limit=gpus
        )  # creates, or updates the tag's limit
    return gpus


# --- timeouts that stop work -------------------------------------------------------------


def stop_dask_work(client: Any, restart_workers: bool, grace_s: float = 3.0) -> str:
    """Cancel every future ``client`` holds; restart workers still running them. Returns what was done."""
    from distributed import Future

    keys = list(client.futures)
    done = [f"cancelled {len(keys)} Dask futures"]
    if keys:
        try:
            client.cancel([Future(k, client) for k in keys], force=True, reason="stage timed out")
        except Exception as exc:  # the scheduler may already be gone; say so and go on
            done.append(f"cancel failed: {type(exc).__name__}: {exc}")
    # Dask cannot interrupt a task already running on a worker thread: it keeps the thread.
    busy = _busy_workers(client, set(keys), grace_s)
    if busy and restart_workers:
        try:
            client.restart(timeout=120, wait_for_workers=True)
            done.append(f"restarted workers ({busy} were still running the stage's tasks)")
        except Exception as exc:
            done.append(f"worker restart failed: {type(exc).__name__}: {exc}")
    elif busy:
        done.append(f"{busy} workers still run the stage's tasks (external cluster: not restarted)")
    return ", ".join(done)


def _running_tasks(dask_worker: Any) -> int:
    """Tasks still executing on a worker's threads (cancelled ones included: Dask cannot stop them)."""
    return len(dask_worker.active_threads)


def _busy_workers(client: Any, keys: set[Any], grace_s: float) -> int:
    """Workers whose threads still run a task after a short grace period (quick tasks finish by
    themselves)."""
    deadline = time.monotonic() + grace_s
    while True:
        try:
            busy = sum(1 for n in client.run(_running_tasks).values() if n)
        except Exception:  # workers gone or unreachable: nothing we can stop
            return 0
        if not busy or time.monotonic() >= deadline:
            return busy
        time.sleep(0.2)


def run_stage(
    stage: str,
    body: Callable[[Any], T],
    address: str | None,
    timeout_seconds: float,
    restart_workers: bool = True,
    connect_timeout: float = 60,
) -> T:
    """Run ``body(client)`` with a Dask client to ``address`` (None: no client), stopped after
    ``timeout_seconds``.

    The body runs in a daemon thread; this (the Prefect task's) thread waits for
    it. On expiry the stage's Dask work is cancelled (workers restarted when
    they stay busy and ``restart_workers``), the client is closed so the body's
    blocking Dask calls fail at once, and :class:`StageTimeout` is raised.
    Work the body does outside Dask (a blocking read in this process) cannot be
    interrupted in Python: that thread is abandoned and ends when its call does.
    """
    from distributed import Client

    client = Client(address, timeout=connect_timeout) if address else None
    outcome: dict[str, Any] = {}
    finished = threading.Event()

    def target() -> None:
        try:
            outcome["value"] = body(client)
        except BaseException as exc:  # handed to the waiting thread
            outcome["error"] = exc
        finally:
            finished.set()

    ctx = contextvars.copy_context()
    worker = threading.Thread(target=ctx.run, args=(target,), name=f"conveyor-stage-{stage}", daemon=True)
    try:
        worker.start()
        if not finished.wait(timeout_seconds):
            detail = stop_dask_work(client, restart_workers) if client is not None else "no Dask work to stop"
            logger.error("stage %s timed out after %g s: %s", stage, timeout_seconds, detail)
            raise StageTimeout(stage, timeout_seconds, detail)
    finally:
        if client is not None:
            client.close(timeout=10)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
