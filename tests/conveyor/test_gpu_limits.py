"""GPU stages carry a tag whose Prefect concurrency limit is the number of GPUs (real Prefect API)."""

from __future__ import annotations

import pytest

from conveyor.policy import GPU_TAG, ensure_gpu_limit, task_options


@pytest.fixture(scope="module", autouse=True)
def _drain_prefect_workers_after():
    """Stop this module's events and log workers once it is done, as the test harness does on exit.

    prefect 3.8 keeps one EventsWorker per process for a running server, keyed without the API
    URL: left running, it would keep sending the next module's task-run states to this session's
    server, not to the harness that module starts (tests/test_policy.py reads them back).
    """
    yield
    from conveyor.prefect_api import drain_prefect

    drain_prefect()


def test_only_gpu_stages_on_a_gpu_cluster_carry_the_tag() -> None:
    assert GPU_TAG in task_options("train", gpu=True)["tags"]
    assert (
        GPU_TAG in task_options("clean", gpu=True)["tags"]
        and GPU_TAG in task_options("evaluate", gpu=True)["tags"]
    )
    assert (
        GPU_TAG not in task_options("ingest", gpu=True)["tags"]
    )  # reads files: CPU work even on a GPU cluster
    assert GPU_TAG not in task_options("deploy", gpu=True)["tags"]
    assert all(GPU_TAG not in task_options(s)["tags"] for s in ("clean", "train", "evaluate"))
    # CPU stages carry no tag at all: each tagged task run asks the API for concurrency slots (a write that
    # a busy local SQLite server can answer with a 503 and a 2-second client retry).
    assert all(task_options(s)["tags"] == [] for s in ("ingest", "clean", "train", "evaluate", "deploy"))


@pytest.fixture
def gpu_limit(prefect_api):
    from prefect.client.orchestration import get_client

    def read() -> int | None:
        from prefect.exceptions import ObjectNotFound

        with get_client(sync_client=True) as client:
            try:
                return client.read_concurrency_limit_by_tag(GPU_TAG).concurrency_limit
            except ObjectNotFound:
                return None

    yield read
    with get_client(sync_client=True) as client:
        try:
            client.delete_concurrency_limit_by_tag(GPU_TAG)
        except Exception:  # already absent
            pass


def test_the_limit_equals_the_gpu_count_and_follows_it(gpu_limit, monkeypatch) -> None:
    monkeypatch.setattr("conveyor.resources.gpu_count", lambda: 0)
    assert ensure_gpu_limit() is None and gpu_limit() is None  # no GPU: nothing to limit
    monkeypatch.setattr("conveyor.resources.gpu_count", lambda: 2)
    assert ensure_gpu_limit() == 2 and gpu_limit() == 2
    assert ensure_gpu_limit() == 2 and gpu_limit() == 2  # idempotent
    assert ensure_gpu_limit(4) == 4 and gpu_limit() == 4  # a machine with more GPUs: the limit follows


def test_a_gpu_stage_waits_for_a_free_slot(gpu_limit) -> None:
    """With the limit at 1, two GPU-tagged task runs never overlap (what keeps two flows off one GPU)."""
    import threading
    import time

    from prefect import flow, task

    ensure_gpu_limit(1)
    assert gpu_limit() == 1
    active, peak, lock = [0], [0], threading.Lock()

    @task(tags=[GPU_TAG])
    def gpu_stage(i: int) -> int:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(1.0)
        with lock:
            active[0] -= 1
        return i

    @flow
    def two_stages() -> list[int]:
        return [f.result() for f in [gpu_stage.submit(1), gpu_stage.submit(2)]]

    assert two_stages() == [1, 2]
    assert peak[0] == 1
