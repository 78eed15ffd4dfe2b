"""Batch serving (issue 17): columnar bodies, and ``conveyor serve --workers N`` over real HTTP.

A small real XGBoost model in a temp store; a real uvicorn on a loopback port, in a thread or as
the ``conveyor serve`` command in its own process group. Every server started here is stopped in
its fixture's teardown.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conveyor.serving import (
    FLOAT32_MAX,
    ModelHolder,
    Rejected,
    SharedSocketLoop,
    create_app,
    encode_predict_body,
    start_in_thread,
)
from conveyor.store.registry import CHAMPION, set_alias
from conveyor.store.storage import Store
from conveyor.tasks.loading import LoadedModel
from conveyor.tasks.scoring import category_codes
from tests.support import TINY_CATEGORIES as CATEGORIES
from tests.support import TINY_FEATURES as FEATURES
from tests.support import TINY_MODEL as MODEL
from tests.support import stop_group, tiny_champion_store, tiny_model

TOKEN = "serving-token-for-tests-only"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REPO = Path(__file__).resolve().parents[2]
ROW = {"distance": 1.0, "temp": None, "carrier": "AA"}
ROWS = [
    ROW,
    {"distance": 3, "temp": -2.5, "carrier": "UA"},
    {"distance": None, "temp": 1e30, "carrier": "ZZ"},  # an unseen carrier scores as missing
    {"distance": -0.5, "temp": 0.25, "carrier": None},
]


def _columns(rows: list[dict]) -> dict:
    return {"columns": {name: [r[name] for r in rows] for name in rows[0]}}


@pytest.fixture
def store(tmp_path) -> Store:
    return tiny_champion_store(tmp_path)


@pytest.fixture
def client(store, alert_receiver) -> Iterator[httpx.Client]:
    running = start_in_thread(create_app(ModelHolder(store, MODEL), poll_seconds=0.05, token=TOKEN))
    client = httpx.Client(base_url=running.url, headers=AUTH, timeout=60)
    try:
        yield client
    finally:
        client.close()
        running.stop()
    assert not running.thread.is_alive()


# --- columnar bodies ---------------------------------------------------------------------------


def test_columns_score_as_the_same_rows_do(client) -> None:
    by_rows = client.post("/predict/features", json={"rows": ROWS})
    by_columns = client.post("/predict/features", json=_columns(ROWS))
    assert by_rows.status_code == 200 and by_columns.status_code == 200, by_columns.text
    assert by_columns.json() == by_rows.json()
    # past the inline size too (the batch path), and with extra columns ignored as extra fields are
    many = ROWS * 2_000
    body = _columns(many)
    body["columns"]["note"] = ["x"] * len(many)
    resp = client.post("/predict/features", json=body)
    assert resp.status_code == 200, resp.text[:300]
    assert resp.json()["probabilities"] == by_rows.json()["probabilities"] * 2_000


@pytest.mark.parametrize(
    ("columns", "loc", "words"),
    [
        (
            {"distance": [1.0, True], "temp": [None, None], "carrier": ["AA", "UA"]},
            ["body", "columns", "distance", 1],
            "must be a number",
        ),
        (
            {"distance": [1.0, 2.0], "temp": [None, 1e39], "carrier": ["AA", "UA"]},
            ["body", "columns", "temp", 1],
            "out of range",
        ),
        (
            {"distance": [1.0], "temp": [None], "carrier": ["\ud800"]},
            ["body", "columns", "carrier", 0],
            "Unicode",
        ),
        ({"distance": [1.0], "carrier": ["AA"]}, ["body", "columns", "temp"], "'temp' is required"),
        (
            {"distance": [1.0], "temp": [None, None], "carrier": ["AA"]},
            ["body", "columns", "temp"],
            "has 2 values but 'distance' has 1",
        ),
        ({"distance": 1.0, "temp": [None], "carrier": ["AA"]}, ["body", "columns", "distance"], "list"),
        ({"distance": [], "temp": [], "carrier": []}, ["body", "columns"], "at least one row"),
        ([[1.0, None, "AA"]], ["body", "columns"], "object"),
    ],
)
def test_a_bad_column_is_one_422_naming_the_field_and_row(client, columns, loc, words) -> None:
    body = json.dumps({"columns": columns}).encode()  # json.dumps escapes a lone surrogate; httpx cannot
    resp = client.post("/predict/features", content=body, headers={"Content-Type": "application/json"})
    assert resp.status_code == 422, resp.text
    [problem] = resp.json()["detail"]
    assert problem["loc"] == loc and words in problem["msg"], problem


def test_rows_and_columns_together_are_refused(client) -> None:
    resp = client.post("/predict/features", json={"rows": [ROW], **_columns([ROW])})
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body"]


PARSER_MODEL = LoadedModel(MODEL, "v", None, {}, FEATURES, CATEGORIES, 0.5)
PROPERTY = settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
numbers = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**60), max_value=10**60)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.floats(min_value=-FLOAT32_MAX, max_value=FLOAT32_MAX)
    | st.sampled_from(["3", "\ud800"])
)
row_batches = st.lists(
    st.fixed_dictionaries(
        {
            "distance": numbers,
            "temp": numbers,
            "carrier": st.none() | st.sampled_from(["AA", "UA", "ZZ", "\ud800", 7]),
        }
    ),
    min_size=1,
    max_size=5,
)


def _encode(document: dict) -> np.ndarray | Rejected:
    body = json.dumps(document).encode()
    try:
        return encode_predict_body(
            body, "application/json", PARSER_MODEL, 1 << 20, category_codes(PARSER_MODEL.categories)
        )
    except Rejected as rejected:
        return rejected


@PROPERTY
@given(batch=row_batches)
def test_columns_encode_as_their_rows_do_or_get_the_same_422(batch) -> None:
    by_rows, by_columns = _encode({"rows": batch}), _encode(_columns(batch))
    if isinstance(by_rows, Rejected):
        assert isinstance(by_columns, Rejected) and by_columns.status == by_rows.status == 422
        moved = [d | {"loc": ["body", "columns", d["loc"][3], d["loc"][2]]} for d in by_rows.detail]
        assert by_columns.detail == moved
    else:
        assert isinstance(by_columns, np.ndarray)
        np.testing.assert_array_equal(by_columns, by_rows)


# --- conveyor serve --workers N ------------------------------------------------------------------


def _children(pid: int) -> list[str]:
    """Command lines of ``pid``'s child processes."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, ValueError):  # gone meanwhile
            continue
    return found


@pytest.fixture
def workers(store, alert_receiver) -> Iterator[tuple[str, subprocess.Popen]]:
    """``conveyor serve --workers 2`` with a token and a small body limit, stopped by its process group."""
    from conveyor.prefect_api import free_port

    port = free_port()
    env = os.environ | {"CONVEYOR_SERVING_TOKEN": TOKEN, "CONVEYOR_SERVING_MAX_BODY_BYTES": "4096"}
    args = ["serve", "--storage-url", store.root, "--model", MODEL, "--port", str(port), "--workers", "2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "conveyor.cli", *args, "--poll-seconds", "0.2"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while len([c for c in _children(proc.pid) if "spawn_main" in c]) < 2 or not _all_ready(url):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "conveyor serve --workers 2 did not come up"
            time.sleep(0.2)
        yield url, proc
    finally:
        stop_group(proc)
        proc.stderr.close()


def _fresh(url: str, path: str, **kwargs) -> httpx.Response:
    """One request on a new connection: the kernel hands each connection to either worker."""
    with httpx.Client(base_url=url, timeout=30) as client:
        return client.request(kwargs.pop("method", "GET"), path, **kwargs)


def _all_ready(url: str) -> bool:
    try:
        return all(_fresh(url, "/health").json()["version"] == "v1" for _ in range(6))
    except httpx.HTTPError:
        return False


def test_every_worker_serves_with_the_token_and_limits(workers, store) -> None:
    url, proc = workers
    assert len([c for c in _children(proc.pid) if "spawn_main" in c]) == 2
    big = json.dumps({"rows": [ROW] * 200}).encode()
    for _ in range(12):
        assert _fresh(url, "/predict/features", method="POST", json={"rows": [ROW]}).status_code == 401
        ok = _fresh(url, "/predict/features", method="POST", json=_columns(ROWS), headers=AUTH)
        assert ok.status_code == 200 and len(ok.json()["probabilities"]) == len(ROWS)
        too_big = _fresh(
            url,
            "/predict/features",
            method="POST",
            content=big,
            headers=AUTH | {"Content-Type": "application/json"},
        )
        assert too_big.status_code == 413
    # each worker watches the alias itself: all of them move to the new champion
    tiny_model(store, "v2", seed=1)
    set_alias(store, MODEL, CHAMPION, "v2", "test", expected="v1", action="promote")
    deadline = time.monotonic() + 30
    while not all(_fresh(url, "/health").json()["version"] == "v2" for _ in range(10)):
        assert time.monotonic() < deadline, "not every worker reloaded"
        time.sleep(0.2)


def test_a_worker_accepts_one_connection_per_wake_up() -> None:
    """So that a burst of new connections spreads over the workers sharing the socket."""
    import asyncio
    import socket

    loop = SharedSocketLoop()
    accepted: list[object] = []

    class Counted(asyncio.Protocol):
        def connection_made(self, transport) -> None:
            accepted.append(transport)

    listener = socket.create_server(("127.0.0.1", 0))
    clients = []
    try:
        server = loop.run_until_complete(loop.create_server(Counted, sock=listener))
        clients = [socket.create_connection(listener.getsockname()) for _ in range(3)]  # all queued
        loop.run_until_complete(asyncio.sleep(0))  # one pass of the loop: one wake-up
        first = len(accepted)
        loop.run_until_complete(asyncio.sleep(0.2))
        assert first == 1 and len(accepted) == 3, (first, len(accepted))
        server.close()
        for transport in accepted:
            transport.close()
        loop.run_until_complete(server.wait_closed())
    finally:
        for client in clients:
            client.close()
        loop.close()


def test_workers_answer_small_requests_without_nagle_delays(workers) -> None:
    """Without TCP_NODELAY on the shared socket each response waits ~40 ms for the client's delayed ACK."""
    url, _ = workers
    with httpx.Client(base_url=url, headers=AUTH, timeout=30) as client:
        timings = []
        for _ in range(15):
            t0 = time.perf_counter()
            assert client.post("/predict/features", json={"rows": [ROW]}).status_code == 200
            timings.append(time.perf_counter() - t0)
    assert statistics.median(timings) < 0.025, timings


def test_a_busy_worker_leaves_new_connections_to_a_free_one() -> None:
    """Four clients connecting at once to two workers sharing a socket: two each, not 3:1 or 4:0.

    Each worker is an event loop in its own thread (``time.sleep`` stands for a request's CPU work,
    which holds a worker's loop as inline work does); both listen on one socket, as the processes of
    ``conveyor serve --workers 2`` do.
    """
    import asyncio
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    served_by: list[int] = []
    transports: list[asyncio.Transport] = []

    class Busy(asyncio.Protocol):
        def __init__(self, worker: int) -> None:
            self.worker = worker

        def connection_made(self, transport) -> None:
            self.transport = transport
            transports.append(transport)

        def data_received(self, data: bytes) -> None:
            time.sleep(0.1)
            served_by.append(self.worker)
            self.transport.write(b"ok")

    loops = [SharedSocketLoop(), SharedSocketLoop()]
    for loop in loops:  # only an answer resumes accepting here: a loaded machine cannot time the pause out
        loop.ACCEPT_PAUSE_S = 30.0
    servers = [
        loop.run_until_complete(
            loop.create_server(lambda i=i: Busy(i), sock=socket.socket(fileno=os.dup(listener.fileno())))
        )
        for i, loop in enumerate(loops)
    ]
    threads = [threading.Thread(target=loop.run_forever, daemon=True) for loop in loops]
    for thread in threads:
        thread.start()
    clients = []
    try:
        clients = [socket.create_connection(listener.getsockname(), timeout=10) for _ in range(4)]
        for client in clients:
            client.sendall(b"x")
        assert [client.recv(2) for client in clients] == [b"ok"] * 4
        assert sorted(served_by) == [0, 0, 1, 1], served_by
    finally:
        for client in clients:
            client.close()
        for loop, thread in zip(loops, threads, strict=True):
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
        for transport in transports:
            transport.close()
        for loop, server in zip(loops, servers, strict=True):
            server.close()
            loop.run_until_complete(server.wait_closed())
            loop.close()
        listener.close()


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_a_non_finite_number_in_a_column_is_refused_as_in_rows(client, literal) -> None:
    """JSON has no NaN or Infinity; the parser that reads them hands the column to the row checks."""
    body = b'{"columns": {"distance": [1.0, %s], "temp": [null, null], "carrier": ["AA", "UA"]}}' % literal
    resp = client.post("/predict/features", content=body, headers={"Content-Type": "application/json"})
    assert resp.status_code == 422, resp.text
    [problem] = resp.json()["detail"]
    assert problem["loc"] == ["body", "columns", "distance", 1] and "finite" in problem["msg"], problem


def test_a_server_warms_its_feature_route_before_the_first_request(store, alert_receiver) -> None:
    """The first request of a process would otherwise pay for imports and first calls (~30 ms)."""
    holder = ModelHolder(store, MODEL)
    running = start_in_thread(create_app(holder, poll_seconds=60, token=TOKEN))
    try:
        assert holder.current is not None and holder.current.version in holder.codes
    finally:
        running.stop()


@pytest.mark.parametrize("own_process", [True, False])
def test_a_server_process_freezes_its_heap_after_start_up(store, alert_receiver, monkeypatch, own_process):
    """``conveyor serve``'s processes do; an app sharing its process (these tests) leaves the GC alone."""
    import conveyor.serving

    calls: list[tuple[str, bool]] = []
    holder = ModelHolder(store, MODEL)

    class FakeGC:
        @staticmethod
        def collect() -> None:
            calls.append(("collect", holder.current is not None))

        @staticmethod
        def freeze() -> None:
            calls.append(("freeze", holder.current is not None))

    monkeypatch.setattr(conveyor.serving, "gc", FakeGC)
    running = start_in_thread(create_app(holder, poll_seconds=60, token=TOKEN, own_process=own_process))
    running.stop()
    assert calls == ([("collect", True), ("freeze", True)] if own_process else [])
