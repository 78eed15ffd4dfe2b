"""Serving latency and throughput of ``conveyor serve`` against the booster called directly in-process.

Starts the real server (uvicorn, in a subprocess so it does not share the
client's GIL) on a loopback port, drives it with a bounded load (a fixed
number of requests from a few concurrent clients) for single rows and for
batches of 1,000, and prints one JSON object: p50/p99 latency and throughput
for each, next to the same work done by ``Booster.inplace_predict`` on an
already-encoded frame, and the ratios. The server is stopped by its pid.

    python -m benchmarks.serving_latency [--storage-url data] [--model flights_late] [--json out.json]

Needs a champion in the store (``make run`` makes one).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def _sample_rows(store: Any, card: dict[str, Any], n: int) -> list[dict[str, Any]]:
    import pandas as pd

    from conveyor.store.storage import open_manifest, part_urls

    url = card["datasets"]["silver_url"]
    frames, have = [], 0
    for part in part_urls(store, url, open_manifest(store, url)):
        with store.fs.open(store.path(part), "rb") as fh:
            frames.append(pd.read_parquet(fh, columns=card["features"]))
        have += len(frames[-1])
        if have >= n:
            break
    return json.loads(pd.concat(frames).head(n).to_json(orient="records"))


def _stats(latencies: list[float], wall: float, rows_per_call: int) -> dict[str, float]:
    ms = np.asarray(latencies) * 1000
    return {
        "requests": len(ms),
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "requests_per_s": round(len(ms) / wall, 1),
        "rows_per_s": round(len(ms) * rows_per_call / wall, 1),
    }


def _drive(call: Callable[[], None], clients: int, per_client: int) -> tuple[list[float], float]:
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []

    def worker(i: int) -> None:
        for _ in range(per_client):
            t0 = time.perf_counter()
            try:
                call()
            except Exception as exc:  # counted, reported: a benchmark must not hide failures
                errors.append(repr(exc))
                continue
            latencies[i].append(time.perf_counter() - t0)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    [t.start() for t in threads]
    [t.join() for t in threads]
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} failed calls, e.g. {errors[0]}")
    return [x for lat in latencies for x in lat], wall


TOKEN = "benchmark-" + os.urandom(8).hex()


def _start_server(storage_url: str, model: str, port: int) -> subprocess.Popen:
    # Serving is closed without a token: the benchmark serves with one of its own and sends it.
    env = os.environ.copy() | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "CONVEYOR_SERVING_TOKEN": TOKEN}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "conveyor.cli",
            "serve",
            "--storage-url",
            storage_url,
            "--model",
            model,
            "--port",
            str(port),
            "--poll-seconds",
            "60",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def run(
    storage_url: str, model: str, clients: int, single_requests: int, batch_requests: int, batch_rows: int
) -> dict[str, Any]:
    import httpx

    from conveyor.flows.training import open_store
    from conveyor.prefect_api import free_port
    from conveyor.store.registry import read_alias
    from conveyor.tasks.loading import load_model
    from conveyor.tasks.scoring import predict_frame, rows_to_frame

    store = open_store(storage_url)
    pointer = read_alias(store, model)
    if pointer is None:
        raise SystemExit(f"no champion of {model} under {store.root}; run `make run` first")
    loaded = load_model(store, model, pointer.version)
    rows = _sample_rows(store, loaded.card, batch_rows)
    encoded_single, encoded_batch = rows_to_frame(rows[:1], loaded), rows_to_frame(rows, loaded)

    result: dict[str, Any] = {
        "model": model,
        "version": loaded.version,
        "clients": clients,
        "batch_rows": len(rows),
        "cpus": os.cpu_count(),
    }
    direct = {
        "single": _drive(
            lambda: loaded.booster.inplace_predict(encoded_single), clients, single_requests // clients
        ),
        "batch": _drive(
            lambda: loaded.booster.inplace_predict(encoded_batch), clients, batch_requests // clients
        ),
    }
    in_process = {  # validation + encoding + prediction, no HTTP: where the server's time goes
        "single": _drive(
            lambda: predict_frame(loaded, rows_to_frame(rows[:1], loaded)),
            clients,
            single_requests // clients,
        ),
        "batch": _drive(
            lambda: predict_frame(loaded, rows_to_frame(rows, loaded)), clients, batch_requests // clients
        ),
    }

    port = free_port()
    proc = _start_server(storage_url, model, port)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).json().get("version") == loaded.version:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not come up")
            time.sleep(0.2)
        local = threading.local()

        def post(payload: dict[str, Any]) -> None:
            client = getattr(local, "client", None)
            if client is None:
                client = local.client = httpx.Client(
                    base_url=url, timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}
                )
            resp = client.post("/predict/features", json=payload)
            resp.raise_for_status()

        single_payload, batch_payload = {"rows": rows[:1]}, {"rows": rows}
        for _ in range(20):
            post(single_payload)  # warm-up
        served = {
            "single": _drive(lambda: post(single_payload), clients, single_requests // clients),
            "batch": _drive(lambda: post(batch_payload), clients, batch_requests // clients),
        }
    finally:
        _stop(proc)

    for kind, n in (("single", 1), ("batch", len(rows))):
        s = _stats(*served[kind], n)
        d = _stats(*direct[kind], n)
        ip = _stats(*in_process[kind], n)
        result[kind] = {
            "served": s,
            "in_process_full_path": ip,
            "booster_direct": d,
            "ratio_served_to_direct": {
                "p50": round(s["p50_ms"] / d["p50_ms"], 1),
                "p99": round(s["p99_ms"] / d["p99_ms"], 1),
                "throughput": round(s["rows_per_s"] / d["rows_per_s"], 4),
            },
        }
    return result


def main(argv: list[str] | None = None) -> int:
    from conveyor.flows.params import DEFAULT_STORAGE

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--storage-url", default=DEFAULT_STORAGE)
    parser.add_argument("--model", default="flights_late")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--single-requests", type=int, default=2000)
    parser.add_argument("--batch-requests", type=int, default=200)
    parser.add_argument("--batch-rows", type=int, default=1000)
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    result = run(
        args.storage_url, args.model, args.clients, args.single_requests, args.batch_requests, args.batch_rows
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
