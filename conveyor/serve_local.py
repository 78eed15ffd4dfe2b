"""A whole served setup on one machine: Prefect server, process work pool with priority queues,
deployments, worker.

    conveyor serve-local        (or: make serve-local)

Then open the UI, pick a deployment (e.g. ``conveyor-training/on-demand``), click
Run and fill in the form. Ctrl-C stops the worker and the server this started.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from conveyor.prefect_api import QUIET_ENV, PrefectApi

REPO = Path(__file__).resolve().parent.parent
POOL = "conveyor-process"
# Lower number = served first: scheduled production retrains go ahead of ad-hoc runs.
QUEUES = {"production": 1, "adhoc": 10}


def _env(api: PrefectApi) -> dict[str, str]:
    env = os.environ.copy() | QUIET_ENV
    env["PREFECT_API_URL"] = api.url
    env["CONVEYOR_REPO"] = str(REPO)
    return env


async def _ensure_pool(api_url: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkQueueUpdate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}):
        async with get_client() as client:
            try:
                await client.create_work_pool(
                    WorkPoolCreate(name=POOL, type="process", description="Conveyor flows as local processes")
                )
            except ObjectAlreadyExists:
                pass
            for name, priority in QUEUES.items():
                try:
                    queue = await client.read_work_queue_by_name(name, work_pool_name=POOL)
                    await client.update_work_queue(
                        queue.id, **WorkQueueUpdate(priority=priority).model_dump(exclude_unset=True)
                    )
                except ObjectNotFound:
                    await client.create_work_queue(name=name, work_pool_name=POOL, priority=priority)


def register(api: PrefectApi, timeout: float = 300) -> None:
    """Create the work pool and queues and the GPU stage limit, then ``prefect deploy --all`` from
    prefect.yaml."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from conveyor.policy import ensure_gpu_limit

    asyncio.run(_ensure_pool(api.url))
    with temporary_settings({PREFECT_API_URL: api.url}):
        ensure_gpu_limit()
    proc = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"],
        cwd=REPO,
        env=_env(api),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"prefect deploy failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}"
        )


def start_worker(api: PrefectApi, log_path: Path, run_once: bool = False) -> subprocess.Popen:
    """A process worker for the pool, in its own process group (stop it with ``stop_group``)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--type", "process"]
    if run_once:
        cmd.append("--run-once")
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            cmd,
            cwd=REPO,
            env=_env(api),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def stop_group(proc: subprocess.Popen, timeout: float = 20) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def serve_local(home: Path, port: int) -> int:
    from conveyor.prefect_api import ensure_api

    api = ensure_api(home, port)
    worker = None
    try:
        print(f"Prefect API at {api.url}; registering the deployments in prefect.yaml ...", flush=True)
        register(api)
        worker = start_worker(api, home / "worker.log")
        print(f"Worker for pool '{POOL}' started (log: {home / 'worker.log'}).")
        print(f"Open {api.ui_url}/deployments, pick one (e.g. conveyor-training / on-demand), click Run.")
        print("Ctrl-C stops the worker" + (" and the server." if api.started else "."), flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(1.0):
            if worker.poll() is not None:
                raise RuntimeError(
                    f"the worker exited with code {worker.returncode}; see {home / 'worker.log'}"
                )
    finally:
        if worker is not None:
            stop_group(worker)
        api.stop()
    return 0
