"""The retry and timeout policy, measured on real Prefect task runs and a real Dask cluster.

Prefect silently ignores some task options (a timeout on a sync task in a
thread; a retry condition that is not a plain function), so each promise of
conveyor/policy.py is checked by counting what actually ran.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import time

import pytest

from conveyor import policy
from conveyor.errors import InputError
from conveyor.policy import StageTimeout, is_transient, policy_for, retry_transient, run_stage, task_options
from conveyor.store.storage import StorageError

BACKOFF = 0.2  # first retry delay in these tests (s); doubled per retry


def _flaky(failures: int, exc: BaseException, stage: str = "ingest", **overrides):
    """A task with the stage's real options that raises ``exc`` ``failures`` times, then returns its
    attempt count."""
    from prefect import task

    attempts: list[float] = []

    @task(**(task_options(stage, backoff_seconds=BACKOFF) | overrides))
    def work() -> int:
        attempts.append(time.monotonic())
        if len(attempts) <= failures:
            raise exc
        return len(attempts)

    return work, attempts


def _run(work):
    from prefect import flow

    states = []

    @flow
    def host() -> None:
        states.append(work(return_state=True))

    host(return_state=True)
    return states[0]


def _states(task_run_id, expect: int):
    """The task run's state history from the API (task states arrive as events: wait for them)."""
    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            for _ in range(150):
                states = await client.read_task_run_states(task_run_id)
                if sum(s.name == "AwaitingRetry" for s in states) >= expect:
                    return states
                await asyncio.sleep(0.2)
            return states

    return asyncio.run(read())


# --- the retry condition ------------------------------------------------------------------


def _client_error(code: str, status: int):
    from botocore.exceptions import ClientError

    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "GetObject",
    )


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionResetError("reset by peer"),
        TimeoutError("read timed out"),
        OSError(errno.EBUSY, "SlowDown"),  # s3fs' translation of S3 throttling / 503
        OSError(121, "InternalError"),  # EREMOTEIO: S3 500
        pytest.param("killed", id="KilledWorker"),
        pytest.param("comm", id="CommClosedError"),
        pytest.param("s3-503", id="ClientError-503"),
        pytest.param("s3-slowdown", id="ClientError-SlowDown"),
        pytest.param("xgb-peer", id="XGBoostError-lost-peer"),
        pytest.param("chained", id="transient-cause"),
    ],
)
def test_transient_faults_are_retried(exc) -> None:
    from distributed import KilledWorker
    from distributed.comm.core import CommClosedError
    from xgboost.core import XGBoostError

    built = {
        "killed": KilledWorker("train-abc", "tcp://127.0.0.1:1", 3),
        "comm": CommClosedError("in <TCP local=... remote=...>: Stream is closed"),
        "s3-503": _client_error("ServiceUnavailable", 503),
        "s3-slowdown": _client_error("SlowDown", 503),
        "xgb-peer": XGBoostError("[12:00:00] Socket error: Connection reset by peer"),
    }
    if exc == "chained":
        try:
            try:
                raise ConnectionResetError("reset")
            except ConnectionResetError as inner:
                raise RuntimeError("while reading part-00001.parquet") from inner
        except RuntimeError as outer:
            exc = outer
    exc = built.get(exc, exc) if isinstance(exc, str) else exc
    assert is_transient(exc), exc


@pytest.mark.parametrize(
    "exc",
    [
        InputError("flights.csv", "carrier", "required column is missing"),
        StorageError("no _manifest.json"),
        ValueError("the train slice is empty"),
        KeyError("carrier"),
        TypeError("unsupported operand"),
        FileNotFoundError("s3://bucket/missing"),
        PermissionError("AccessDenied"),
        OSError(errno.EINVAL, "InvalidArgument"),
        StageTimeout("train", 2.0),
        pytest.param("s3-403", id="ClientError-403"),
        pytest.param("xgb-param", id="XGBoostError-bad-param"),
    ],
)
def test_permanent_faults_fail_at_once(exc) -> None:
    from xgboost.core import XGBoostError

    built = {
        "s3-403": _client_error("AccessDenied", 403),
        "xgb-param": XGBoostError("Invalid parameter: max_depth=-1"),
    }
    exc = built.get(exc, exc) if isinstance(exc, str) else exc
    assert not is_transient(exc), exc


# --- measured on real Prefect task runs -----------------------------------------------------


def test_transient_fault_twice_then_success_runs_three_times(prefect_api) -> None:
    work, attempts = _flaky(2, ConnectionResetError("connection reset by peer"))
    state = _run(work)
    assert state.is_completed() and state.result() == 3
    assert len(attempts) == 3


def test_validation_error_runs_once_with_its_message(prefect_api) -> None:
    work, attempts = _flaky(5, InputError("flights.csv", "carrier", "required column is missing"))
    state = _run(work)
    assert state.is_failed() and len(attempts) == 1
    with pytest.raises(InputError, match="flights.csv: field 'carrier': required column is missing"):
        state.result()


def test_retries_are_exhausted_then_the_fault_is_reported(prefect_api) -> None:
    work, attempts = _flaky(10, ConnectionResetError("connection reset by peer"), stage="clean")
    state = _run(work)
    assert state.is_failed() and len(attempts) == policy.POLICIES["clean"].retries + 1
    with pytest.raises(ConnectionResetError):
        state.result()


def test_backoff_is_exponential_with_real_jitter(prefect_api) -> None:
    """Read the delays Prefect scheduled (AwaitingRetry) and the gaps that really passed between attempts."""
    from prefect.utilities.math import lower_clamp_multiple

    stage = "ingest"
    jitter = policy.POLICIES[stage].jitter
    retries = policy.POLICIES[stage].retries
    work, attempts = _flaky(retries, OSError(errno.EBUSY, "SlowDown"), stage=stage)
    state = _run(work)
    assert state.is_completed() and len(attempts) == retries + 1

    states = _states(state.state_details.task_run_id, retries)
    waits = sorted((s for s in states if s.name == "AwaitingRetry"), key=lambda s: s.timestamp)
    assert len(waits) == retries
    delays = [(s.state_details.scheduled_time - s.timestamp).total_seconds() for s in waits]
    nominal = [BACKOFF * 2**i for i in range(retries)]
    for delay, mean in zip(delays, nominal, strict=False):
        assert mean * lower_clamp_multiple(1 + jitter) - 0.01 <= delay <= mean * (1 + jitter) + 0.01, (
            delay,
            mean,
        )
    # Jitter is applied: no delay is exactly its nominal exponential value, and the ratios to it differ.
    ratios = [d / m for d, m in zip(delays, nominal, strict=False)]
    assert all(abs(r - 1) > 1e-6 for r in ratios) and len({round(r, 6) for r in ratios}) == len(ratios)
    # And the wait really happened before each next attempt.
    gaps = [b - a for a, b in zip(attempts, attempts[1:], strict=False)]
    assert all(g >= d - 0.05 for g, d in zip(gaps, delays, strict=False)), (gaps, delays)


def test_a_retry_condition_that_is_not_a_plain_function_is_silently_never_retried(prefect_api) -> None:
    """Why retry_transient must stay a plain function: prefect 3.8 reads any other callable as 'do not
    retry'."""
    work, attempts = _flaky(
        2, ConnectionResetError("reset"), retry_condition_fn=functools.partial(retry_transient)
    )
    state = _run(work)
    assert state.is_failed() and len(attempts) == 1


# --- overrides ----------------------------------------------------------------------------


def test_timeouts_and_backoff_come_from_params_then_env_then_defaults(monkeypatch) -> None:
    assert policy_for("train").timeout_seconds == policy.POLICIES["train"].timeout_seconds
    monkeypatch.setenv("CONVEYOR_TIMEOUT_TRAIN", "7")
    monkeypatch.setenv("CONVEYOR_RETRY_BACKOFF", "0.5")
    assert policy_for("train").timeout_seconds == 7 and policy_for("train").backoff_factor == 0.5
    assert policy_for("train", {"train": 2}).timeout_seconds == 2  # a parameter beats the environment
    assert policy_for("clean").timeout_seconds == policy.POLICIES["clean"].timeout_seconds
    assert task_options("clean", backoff_seconds=1.0)["retry_delay_seconds"](2) == [1.0, 2.0]
    monkeypatch.setenv("CONVEYOR_TIMEOUT_CLEAN", "soon")
    with pytest.raises(ValueError, match="CONVEYOR_TIMEOUT_CLEAN='soon' is not a number"):
        policy_for("clean")


# --- timeouts stop the work ---------------------------------------------------------------


def test_a_hung_stage_is_stopped_and_the_cluster_stays_usable(dask_client) -> None:
    address = dask_client.scheduler.address

    def hang(client):
        return client.submit(time.sleep, 600, pure=False).result()

    with pytest.raises(
        StageTimeout, match=r"stage 'train' exceeded its timeout of 2 s and was stopped"
    ) as err:
        run_stage("train", hang, address, timeout_seconds=2)
    assert "restarted workers" in str(err.value)  # the sleeping task held a worker thread: it was freed
    assert not any(dask_client.processing().values())
    assert dask_client.submit(sum, [1, 2, 3], pure=False).result() == 6
    assert not is_transient(err.value)  # a timed-out stage is not retried


def test_a_stage_within_its_limit_returns_its_result(dask_client) -> None:
    address = dask_client.scheduler.address
    assert (
        run_stage("clean", lambda c: c.submit(sum, [1, 2], pure=False).result(), address, timeout_seconds=60)
        == 3
    )
    with pytest.raises(InputError, match="bad.csv"):
        run_stage(
            "ingest", lambda c: (_ for _ in ()).throw(InputError("bad.csv", None, "cannot read")), address, 60
        )
