"""Serving latency and throughput of ``conveyor serve`` against the booster called directly in-process.

Starts the real server (``conveyor serve``, one worker process per core unless
``--workers`` says otherwise, in a subprocess so it does not share the client's
GIL) on a loopback port, drives it with a bounded load (a fixed number of
requests from a few concurrent clients) for single rows and for batches of
1,000, and prints one JSON object: p50/p99 latency and throughput
for each, next to the same work done by ``Booster.inplace_predict`` on the
already-encoded frame (``booster_direct``, the original baseline) and on the
float32 matrix the server now builds (``booster_direct_numpy``, stricter),
and the ratios to each. Request bodies are serialised once, up front. The ``raw`` section drives
``POST /predict`` with the same number of raw rows (bronze flights rows, as
a client would send them; features computed by the server) and compares it
with the feature-row route. The batch is sent as columns (``{"columns": {...}}``,
the README's batch format); ``batch.rows_body`` is the same batch sent as row
objects. The server is stopped by its process group.

    python -m benchmarks.serving_latency [--storage-url data] [--model flights_late] [--workers N]
        [--json out.json]

Needs a champion in the store (``make run`` makes one).
"""

from __future__ import annotations

import argparse
import http.client
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
import orjson

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


def _raw_sample(store: Any, card: dict[str, Any], featurizer: Any, n: int) -> list[dict[str, Any]]:
    """Unlabelled main-table rows as JSON records, from the bronze version the model was trained on; only
    rows the spec accepts (a quarantined row is a 422, not a prediction)."""
    from conveyor.store.storage import open_manifest, read_dataset_pandas
    from conveyor.tasks.inference import featurize_rows

    main = featurizer.loaded.spec.main
    version = open_manifest(store, card["datasets"]["silver_url"]).lineage["bronze"][main]
    bronze = read_dataset_pandas(
        store, store.dataset_url(f"bronze_{main}", version), featurizer.raw_schema.names
    )
    records = json.loads(bronze.head(2 * n).to_json(orient="records", date_format="iso", date_unit="s"))
    _, problems = featurize_rows(featurizer, records)
    rejected = {p.row for p in problems}
    rows = [r for i, r in enumerate(records) if i not in rejected][:n]
    if len(rows) < n:
        raise SystemExit(f"only {len(rows)} of the first {2 * n} {main} rows are valid")
    return rows


def _ratios(served: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    """Served over ``base``: latency percentiles (lower is better) and rows/s (higher is better)."""
    return {
        "p50": round(served["p50_ms"] / base["p50_ms"], 1),
        "p99": round(served["p99_ms"] / base["p99_ms"], 1),
        "throughput": round(served["rows_per_s"] / base["rows_per_s"], 4),
    }


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


def _start_server(storage_url: str, model: str, port: int, workers: int | None) -> subprocess.Popen:
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
            *(["--workers", str(workers)] if workers else []),
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
    storage_url: str,
    model: str,
    clients: int,
    single_requests: int,
    batch_requests: int,
    batch_rows: int,
    workers: int | None = None,
) -> dict[str, Any]:
    import httpx

    from conveyor.flows.training import open_store
    from conveyor.prefect_api import free_port
    from conveyor.store.registry import read_alias
    from conveyor.tasks.inference import FastEncoder, feature_columns_matrix, featurizer_for_card
    from conveyor.tasks.loading import load_model
    from conveyor.tasks.scoring import category_codes, feature_matrix, predict_matrix, rows_to_frame

    store = open_store(storage_url)
    pointer = read_alias(store, model)
    if pointer is None:
        raise SystemExit(f"no champion of {model} under {store.root}; run `make run` first")
    loaded = load_model(store, model, pointer.version)
    rows = _sample_rows(store, loaded.card, batch_rows)
    columns = {name: [row[name] for row in rows] for name in loaded.features}
    featurizer = featurizer_for_card(store, loaded.card)
    encoder = FastEncoder(featurizer, loaded.features, loaded.categories)
    raw_rows = _raw_sample(store, loaded.card, featurizer, batch_rows)
    codes = category_codes(loaded.categories)
    # The booster's own input: the encoded frame (the original baseline) and the float32 matrix the server
    # now passes (a stricter baseline: a one-row matrix skips pandas' per-column work in XGBoost too).
    frame_single, frame_batch = rows_to_frame(rows[:1], loaded), rows_to_frame(rows, loaded)
    matrix_single, matrix_batch = feature_matrix(rows[:1], loaded, codes), feature_matrix(rows, loaded, codes)

    result: dict[str, Any] = {
        "model": model,
        "version": loaded.version,
        "clients": clients,
        "batch_rows": len(rows),
        "cpus": os.cpu_count(),
        "workers": workers or "default (one per core)",
        "batch_body": "columns",
    }
    predict = loaded.booster.inplace_predict
    direct = {
        "single": _drive(lambda: predict(frame_single), clients, single_requests // clients),
        "batch": _drive(lambda: predict(frame_batch), clients, batch_requests // clients),
    }
    direct_numpy = {
        "single": _drive(lambda: predict(matrix_single), clients, single_requests // clients),
        "batch": _drive(lambda: predict(matrix_batch), clients, batch_requests // clients),
    }
    in_process = {  # validation + encoding + prediction, no HTTP: where the server's time goes
        "single": _drive(
            lambda: predict_matrix(loaded, feature_matrix(rows[:1], loaded, codes)),
            clients,
            single_requests // clients,
        ),
        "batch": _drive(
            lambda: predict_matrix(loaded, feature_columns_matrix(columns, loaded.features, codes)),
            clients,
            batch_requests // clients,
        ),
        "batch_rows": _drive(
            lambda: predict_matrix(loaded, feature_matrix(rows, loaded, codes)),
            clients,
            batch_requests // clients,
        ),
        "raw_single": _drive(
            lambda: predict_matrix(loaded, encoder.encode(raw_rows[:1])[0]),
            clients,
            single_requests // clients,
        ),
        "raw_batch": _drive(
            lambda: predict_matrix(loaded, encoder.encode(raw_rows)[0]), clients, batch_requests // clients
        ),
    }

    port = free_port()
    proc = _start_server(storage_url, model, port, workers)
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

        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}

        def post(body: bytes, route: str = "/predict/features") -> None:
            # The standard library's HTTP/1.1 client, one keep-alive connection per client thread: the
            # load generator shares the server's cores, and httpx spent 1.1-1.5 ms of them per request.
            conn = getattr(local, "conn", None)
            if conn is None:
                conn = local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request("POST", route, body=body, headers=headers)
            resp = conn.getresponse()
            answer = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{route}: HTTP {resp.status}: {answer[:200]!r}")

        # Bodies serialised once: a client's own JSON encoding is not the server's time.
        single_payload, batch_payload = orjson.dumps({"rows": rows[:1]}), orjson.dumps({"columns": columns})
        batch_rows_payload = orjson.dumps({"rows": rows})
        raw_single, raw_batch = orjson.dumps({"rows": raw_rows[:1]}), orjson.dumps({"rows": raw_rows})
        for _ in range(20):
            post(single_payload)  # warm-up
            post(raw_single, "/predict")
        served = {
            "single": _drive(lambda: post(single_payload), clients, single_requests // clients),
            "batch": _drive(lambda: post(batch_payload), clients, batch_requests // clients),
            "batch_rows": _drive(lambda: post(batch_rows_payload), clients, batch_requests // clients),
            "raw_single": _drive(lambda: post(raw_single, "/predict"), clients, single_requests // clients),
            "raw_batch": _drive(lambda: post(raw_batch, "/predict"), clients, batch_requests // clients),
        }
    finally:
        _stop(proc)

    for kind, n in (("single", 1), ("batch", len(rows))):
        s = _stats(*served[kind], n)
        d = _stats(*direct[kind], n)
        dn = _stats(*direct_numpy[kind], n)
        ip = _stats(*in_process[kind], n)
        result[kind] = {
            "served": s,
            "in_process_full_path": ip,
            "booster_direct": d,
            "booster_direct_numpy": dn,
            "ratio_served_to_direct": _ratios(s, d),
            "ratio_served_to_direct_numpy": _ratios(s, dn),
        }
    # The batch above sends columns (README: "Batches as columns"); the same rows as row objects:
    rows_s, rows_ip = _stats(*served["batch_rows"], len(rows)), _stats(*in_process["batch_rows"], len(rows))
    direct_batch = result["batch"]["booster_direct"]
    result["batch"]["rows_body"] = {
        "served": rows_s,
        "in_process_full_path": rows_ip,
        "ratio_served_to_direct": _ratios(rows_s, direct_batch),
    }
    raw_s, raw_b = _stats(*served["raw_single"], 1), _stats(*served["raw_batch"], len(rows))
    result["raw"] = {
        "single": {"served": raw_s, "in_process_full_path": _stats(*in_process["raw_single"], 1)},
        "batch": {"served": raw_b, "in_process_full_path": _stats(*in_process["raw_batch"], len(rows))},
        "fast_path": not encoder.problem,
        "ratio_raw_to_features": {
            "p50": round(raw_s["p50_ms"] / result["single"]["served"]["p50_ms"], 2),
            "p99": round(raw_s["p99_ms"] / result["single"]["served"]["p99_ms"], 2),
            "batch_p50": round(raw_b["p50_ms"] / result["batch"]["served"]["p50_ms"], 2),
            "throughput": round(raw_b["rows_per_s"] / result["batch"]["served"]["rows_per_s"], 4),
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
    parser.add_argument("--batch-requests", type=int, default=800)
    parser.add_argument("--batch-rows", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=None, help="server processes (default: one per core)")
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    result = run(
        args.storage_url,
        args.model,
        args.clients,
        args.single_requests,
        args.batch_requests,
        args.batch_rows,
        args.workers,
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
