"""Local trust: the Prefect API we adopt, the Dask dashboard's interface, secrets in alert URLs
(issue 16, items 9 and 11). Every server started here is stopped in its fixture's teardown."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest

from conveyor import alerts
from conveyor import prefect_api as api_module
from conveyor.alerts import Alert, send_alert


@pytest.fixture
def impostor() -> Iterator[tuple[int, dict[str, object]]]:
    """Something on a loopback port that answers 200 to anything (``answers`` sets per-path JSON)."""
    answers: dict[str, object] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server naming)
            body = json.dumps(answers.get(self.path, "ok")).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_port, answers
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_ensure_api_does_not_adopt_whatever_answers_200(impostor, monkeypatch, tmp_path) -> None:
    import prefect
    from prefect.client.constants import SERVER_API_VERSION

    port, answers = impostor
    started: list[int] = []

    def fake_start(home: Path, port: int, log_path: Path, wait: bool = True) -> api_module.PrefectApi:
        started.append(port)
        return api_module.PrefectApi(url=f"http://127.0.0.1:{port}/api")

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr(api_module, "start_server", fake_start)
    imitations = [
        {},  # 200 "ok" everywhere: what the old check adopted
        {"/api/health": True},
        {"/api/health": True, "/api/version": SERVER_API_VERSION},
        {"/api/health": True, "/api/version": SERVER_API_VERSION, "/api/admin/version": "2.20.0"},
    ]
    for answer in imitations:
        answers.clear()
        answers.update(answer)
        api = api_module.ensure_api(tmp_path, port)
        assert api.url != f"http://127.0.0.1:{port}/api" and started[-1] != port, answer
    assert len(started) == len(imitations)

    answers["/api/admin/version"] = prefect.__version__  # every answer a Prefect server of ours gives
    assert api_module.ensure_api(tmp_path, port).url == f"http://127.0.0.1:{port}/api"
    assert len(started) == len(imitations)


def test_a_real_prefect_server_is_recognised(prefect_api) -> None:
    from prefect.settings import PREFECT_API_URL

    assert api_module.is_prefect_server(PREFECT_API_URL.value(), timeout=10)


def _listening() -> set[tuple[int, str, int]]:
    """(pid, address, port) of every listening socket of this process and its children."""
    me = psutil.Process()
    found = set()
    for proc in [me, *me.children(recursive=True)]:
        try:
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add((proc.pid, conn.laddr.ip, conn.laddr.port))
        except psutil.Error:  # a child that just exited
            continue
    return found


def test_the_local_cluster_and_its_dashboard_listen_on_loopback_only() -> None:
    from conveyor.cluster import ClusterChoice, cluster_kwargs, dask_cluster

    assert cluster_kwargs(ClusterChoice("cpu", n_workers=1, threads_per_worker=1))["dashboard_address"] == (
        "127.0.0.1:0"
    )
    before = _listening()
    with dask_cluster("cpu", n_workers=1) as address:
        opened = _listening() - before
    assert address.startswith("tcp://127.0.0.1:")
    assert opened, "the cluster should have opened listening sockets"
    assert {ip for _, ip, _ in opened} <= {"127.0.0.1", "::1"}, opened


# --- item 11: secrets in apprise URLs ------------------------------------------------------------

SECRET = "SECRET-TOKEN-123"


@pytest.mark.parametrize(
    "url",
    [
        f"tgram://123456:{SECRET}/987654",
        f"slack://{SECRET}/B0000/C0000",
        f"discord://1234/{SECRET}",
        f"mailto://user:{SECRET}@example.com",
        f"pover://{SECRET}@{SECRET}",
        f"https://user:{SECRET}@hooks.example.com/services/{SECRET}?token={SECRET}",
        f"http://hooks.example.com:{SECRET}/x",
        f"{SECRET}",
        f"weird//{SECRET}",
    ],
)
def test_redaction_never_shows_a_secret(url) -> None:
    shown = alerts._redact(url)
    assert SECRET not in shown and "123456" not in shown
    assert shown == alerts._redact(url) and shown != alerts._redact(url + "x")  # stable, tells them apart


def test_webhooks_keep_their_host_and_apprise_urls_their_scheme() -> None:
    assert alerts._redact("https://hooks.slack.com/services/T/B/X").startswith("https://hooks.slack.com/… [")
    assert alerts._redact(f"tgram://123:{SECRET}/chat").startswith("tgram://… [")


def test_a_failed_apprise_delivery_logs_no_secret(monkeypatch, caplog) -> None:
    def unreachable(url: str, alert: Alert) -> None:
        raise ConnectionError("no route to the destination")

    monkeypatch.setattr(alerts, "BACKOFF_S", 0.001)
    monkeypatch.setattr(alerts, "_apprise", unreachable)
    url = f"tgram://123456789:{SECRET}/987654321"
    with caplog.at_level(logging.ERROR, logger="conveyor.alerts"):
        [delivery] = send_alert(Alert("flow.failed", "x"), webhooks=[], apprise_urls=[url])
    assert not delivery.delivered and "ALERT NOT DELIVERED" in caplog.text
    assert SECRET not in caplog.text and SECRET not in delivery.destination
