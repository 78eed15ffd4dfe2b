"""Shared fixtures: one small local Dask cluster per session, a real-data sample, a tmp storage root."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from conveyor.tasks.ingest import packaged_source_url
from tests.support import SAMPLE_ROWS


def pytest_configure(config: pytest.Config) -> None:
    """The operator settings of a test run (conveyor.operator): roots under the temp dir and the moto
    bucket are allowed. In os.environ, so the subprocesses the tests start inherit them."""
    import os
    import tempfile

    from tests.support import REPO_ROOT

    roots = f"{REPO_ROOT / 'data'},{os.path.realpath(tempfile.gettempdir())},s3://conveyor-test"
    for kind in ("STORAGE", "SOURCE", "REPLICA"):
        os.environ.setdefault(f"CONVEYOR_ALLOWED_{kind}_PREFIXES", roots)
    # A command that starts a Prefect server stops it when it ends (tests leave nothing listening);
    # tests of the kept server set this themselves.
    os.environ.setdefault("CONVEYOR_KEEP_SERVER_MINUTES", "0")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from conveyor.resources import gpu_count

    if gpu_count():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (NVML sees none)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def dask_client():
    """Two worker processes, one thread each: the shape of the CI machine."""
    import os

    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0")
    client = Client(cluster)
    os.environ.setdefault("CONVEYOR_ALLOWED_SCHEDULERS", cluster.scheduler_address)  # flows may use it
    try:
        yield client
    finally:
        client.close()
        cluster.close()


@pytest.fixture(scope="session")
def _prefect_server():
    """A real Prefect API (a temporary server process) for the session; prefect-dask's pattern."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def prefect_api(_prefect_server):
    """The session's Prefect API, with this process's event and log workers started afresh for the test.

    The one definition: every test that needs the API asks for this fixture. prefect 3.8 keeps one
    EventsWorker per process, keyed without the API URL, and it sends to the first server it saw:
    drained here before the test (one left by a test that used another server) and after (this
    test's events reach this API before the next test reads its own).
    """
    from conveyor.prefect_api import drain_prefect

    drain_prefect()
    yield
    drain_prefect()


@pytest.fixture(scope="session")
def packaged_dir() -> Path:
    return Path(packaged_source_url().removeprefix("file://"))


@pytest.fixture(scope="session")
def small_source(tmp_path_factory: pytest.TempPathFactory, packaged_dir: Path) -> Path:
    """A folder of the real tables, flights cut to the first 5,000 rows (as text, untouched)."""
    folder = tmp_path_factory.mktemp("source")
    for name in ("weather.csv", "planes.csv", "airlines.csv", "airports.csv"):
        shutil.copy(packaged_dir / name, folder / name)
    flights = pd.read_csv(packaged_dir / "flights.csv.zip", dtype=str, keep_default_na=False, nrows=5_000)
    flights.to_csv(folder / "flights.csv", index=False)
    return folder


@dataclass
class PipelineRun:
    store: object
    ingested: object
    cleaned: object
    trained: object
    evaluation: object
    deployed: object


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory, dask_client) -> PipelineRun:
    """The five stages once, on a deterministic sample of the real flights."""
    from conveyor.store.storage import Store
    from conveyor.tasks import clean, deploy, evaluate, ingest, train

    store = Store.from_url(tmp_path_factory.mktemp("store").as_uri())
    ingested = ingest.ingest(store, dask_client, None, ingest.IngestParams(max_rows=SAMPLE_ROWS))
    cleaned = clean.clean(store, ingested, dask_client)
    trained = train.train(store, cleaned, dask_client, train.TrainParams(num_boost_round=200))
    evaluation = evaluate.evaluate(store, cleaned, trained, dask_client)
    deployed = deploy.deploy(store, cleaned, trained, evaluation)
    return PipelineRun(store, ingested, cleaned, trained, evaluation, deployed)


# --- a webhook receiver for alerts -----------------------------------------------------------


@pytest.fixture
def receiver():
    """A real HTTP webhook receiver on a loopback port: yields (url, received JSON bodies); stopped in
    teardown."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    received: list[dict] = []
    arrived = threading.Condition()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server naming)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with arrived:
                received.append(json.loads(body))
                arrived.notify_all()
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/hook", received
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def alert_receiver(receiver, monkeypatch):
    """The webhook receiver, with CONVEYOR_ALERT_WEBHOOKS pointing send_alert at it."""
    url, received = receiver
    monkeypatch.setenv("CONVEYOR_ALERT_WEBHOOKS", url)
    monkeypatch.setenv("CONVEYOR_ALERT_APPRISE", "")
    return received


# --- S3: a real S3 protocol server (moto's server mode), s3fs's own test pattern -------------

S3_KEYS = {"key": "testing", "secret": "testing"}


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's ThreadedMotoServer on a loopback port for the session; stopped in teardown."""
    from moto.server import ThreadedMotoServer

    from conveyor.prefect_api import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_options(s3_endpoint, monkeypatch) -> dict:
    """Fresh, empty S3 for each test (moto reset), plus the fsspec options to reach it."""
    import urllib.request

    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_KEYS["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_KEYS["secret"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    urllib.request.urlopen(
        urllib.request.Request(f"{s3_endpoint}/moto-api/reset", method="POST"), timeout=10
    ).close()
    s3fs.S3FileSystem.clear_instance_cache()
    options = {"endpoint_url": s3_endpoint, **S3_KEYS}
    s3fs.S3FileSystem(**options).mkdir("conveyor-test")
    return options
