"""Alert delivery to a real local HTTP receiver; a dead destination is logged, never raised."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from flows import alerts
from flows.alerts import Alert, send_alert


@pytest.fixture
def receiver():
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server naming)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append(json.loads(body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/hook", received
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_webhook_receives_the_json_payload(receiver) -> None:
    url, received = receiver
    [delivery] = send_alert(Alert("flow.failed", "training failed", {"flow_run_id": "abc"}), webhooks=[url], apprise_urls=[])
    assert delivery.delivered and delivery.attempts == 1
    assert received == [received[0]] and received[0]["kind"] == "flow.failed"
    assert received[0]["details"] == {"flow_run_id": "abc"}


def test_dead_destination_is_retried_then_logged(monkeypatch, caplog) -> None:
    from flows.api import free_port

    monkeypatch.setattr(alerts, "BACKOFF_S", 0.01)
    dead = f"http://127.0.0.1:{free_port()}/hook?token=secret"
    with caplog.at_level(logging.ERROR, logger="conveyor.alerts"):
        [delivery] = send_alert(Alert("flow.failed", "x"), webhooks=[dead], apprise_urls=[])
    assert not delivery.delivered and delivery.attempts == alerts.ATTEMPTS
    assert "ALERT NOT DELIVERED" in caplog.text
    assert "secret" not in caplog.text  # tokens in destination URLs never reach the log
