"""Fault-injection suite plumbing: a tally of injected faults printed as one line, an S3 fault proxy, a
receiver.

Each fault test records what it injected and what it observed through the
``faults`` fixture; the last line of the run (also with ``-q``) is
``faults injected N, recovered N, rows lost 0, partial objects visible 0, alerts delivered N/N``.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


@dataclass
class Tally:
    injected: int = 0
    recovered: int = 0  # recovered, or failed the clear way the design promises
    rows_lost: int = 0
    partial_visible: int = 0
    alerts_sent: int = 0
    alerts_delivered: int = 0
    names: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"faults injected {self.injected}, recovered {self.recovered}, rows lost {self.rows_lost}, "
            f"partial objects visible {self.partial_visible}, "
            f"alerts delivered {self.alerts_delivered}/{self.alerts_sent}"
        )


TALLY = Tally()


class FaultLog:
    """What one test injected and saw; added to the tally only when the test's checks passed."""

    def __init__(self, name: str):
        self.name = name
        self.entry = Tally()

    def injected(self, n: int = 1) -> None:
        self.entry.injected += n

    def recovered(self, n: int = 1) -> None:
        self.entry.recovered += n

    def rows_lost(self, n: int) -> None:
        self.entry.rows_lost += n

    def partial_visible(self, n: int) -> None:
        self.entry.partial_visible += n

    def alerts(self, sent: int, delivered: int) -> None:
        self.entry.alerts_sent += sent
        self.entry.alerts_delivered += delivered


@pytest.fixture
def faults(request):
    log = FaultLog(request.node.name)
    yield log
    e = log.entry
    # Injected faults count even when the test failed (so a failure shows as "not recovered").
    TALLY.injected += e.injected
    TALLY.names.append(log.name)
    passed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.passed
    if passed:
        TALLY.recovered += e.recovered
        TALLY.rows_lost += e.rows_lost
        TALLY.partial_visible += e.partial_visible
        TALLY.alerts_delivered += e.alerts_delivered
    TALLY.alerts_sent += e.alerts_sent


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.rep_call = report


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if TALLY.names:
        terminalreporter.write_line(TALLY.line())


# --- a real local HTTP receiver for alerts -------------------------------------------------

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
