"""Fault-injection suite plumbing: a tally computed from what was observed, an S3 fault proxy.

Each fault test declares the faults it injects through the ``faults`` fixture
and records what it *observed*, before asserting anything: the evidence that
the fault was hit (a proxy hit counter, a killed pid, a log line, a file's
size), whether the promised recovery happened, rows written against rows read
back from storage, and alert destinations tried against deliveries seen at
the receiver. After every test the stores it registered are scanned: every
dataset, quarantine and model version folder, for objects without a manifest
(left for gc, invisible to readers) and for committed versions whose files do
not match their manifest; those are read through the product's readers, and
any the reader serves counts as a partial object visible. The observations
count whether the test passed or not, so a broken recovery shows in the line
printed at the end of the run (also with ``-q``)::

    faults injected N (confirmed hit N), recovered N/N, rows lost 0 of N written,
    partial objects visible 0 (N versions scanned: ...), alerts delivered N/N (...)
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.faults.tally import FaultLog, Tally
from tests.support import allow_roots

TALLY = Tally()


@pytest.fixture
def faults():
    """Request it last, after the fixtures whose stores it scans (it is torn down first)."""
    fault_log = FaultLog()
    yield fault_log
    TALLY.add(fault_log.finish())  # observations count whether the test passed or not


@pytest.fixture
def operator_allows(monkeypatch, tmp_path_factory, dask_client):
    """The operator's allowances for what these tests name in flow parameters: pytest's temporary
    folders and the test bucket, the session's scheduler."""
    allow_roots(
        monkeypatch,
        tmp_path_factory.getbasetemp(),
        "s3://conveyor-test",
        schedulers=(dask_client.scheduler.address,),
    )


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if TALLY.faults:
        terminalreporter.write_line(TALLY.line())


# --- an S3 fault proxy in front of moto's server ---------------------------------------------

S3_SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-connection",
    "content-length",
}


@dataclass
class Rule:
    method: str  # "PUT", "GET", "*"
    pattern: str  # regex searched in the request path (unquoted)
    action: str  # "503" or "hang"
    times: int  # how many matching requests get the fault; -1 = all
    hits: int = 0


class S3FaultProxy:
    """Forwards to moto; requests matching a rule get a 503 SlowDown or hang until released."""

    def __init__(self, upstream: str):
        self.upstream = urllib.parse.urlsplit(upstream)
        self.rules: list[Rule] = []
        self.requests: list[tuple[str, str]] = []
        self.release = threading.Event()
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().strip().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                path = urllib.parse.unquote(self.path)
                rule = proxy.match(self.command, path)
                if rule is not None and rule.action == "hang":
                    proxy.release.wait()
                    self.close_connection = True
                    return
                if rule is not None:
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(S3_SLOWDOWN)))
                    self.end_headers()
                    self.wfile.write(S3_SLOWDOWN)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
                    headers["Content-Length"] = str(len(body))
                    conn.request(
                        self.command,
                        self.path,
                        body=body if self.command not in {"GET", "HEAD"} or body else None,
                        headers=headers,
                    )
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in HOP:
                            self.send_header(k, v)
                    self.send_header(
                        "Content-Length",
                        str(len(data) if self.command != "HEAD" else resp.getheader("Content-Length") or 0),
                    )
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def match(self, method: str, path: str) -> Rule | None:
        with self.lock:
            self.requests.append((method, path))
            for rule in self.rules:
                if (
                    rule.method in {method, "*"}
                    and re.search(rule.pattern, path)
                    and (rule.times < 0 or rule.hits < rule.times)
                ):
                    rule.hits += 1
                    return rule
        return None

    def inject(self, method: str, pattern: str, action: str = "503", times: int = -1) -> Rule:
        rule = Rule(method, pattern, action, times)
        with self.lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()

    def start(self) -> S3FaultProxy:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def s3_proxy(s3_options, monkeypatch):
    """A fault proxy in front of the (reset) moto server; the pipeline's storage options point at it."""
    import s3fs

    proxy = S3FaultProxy(s3_options["endpoint_url"]).start()
    options = {**s3_options, "endpoint_url": proxy.url}
    monkeypatch.setenv("CONVEYOR_STORAGE_OPTIONS", json.dumps(options))
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield proxy, options
    finally:
        proxy.stop()
        s3fs.S3FileSystem.clear_instance_cache()
