"""Alerts: one function every flow, hook and server calls; delivery never fails the pipeline.

Destinations come from the environment (never from code or parameters):
``CONVEYOR_ALERT_WEBHOOKS`` (comma-separated URLs receiving a JSON POST) and
``CONVEYOR_ALERT_APPRISE`` (comma-separated apprise URLs: Slack, email, ...).
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

logger = logging.getLogger("conveyor.alerts")

ATTEMPTS = 3
BACKOFF_S = 0.5
TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Alert:
    kind: str  # e.g. "flow.failed", "model.rollback", "serving.reload_failed", "monitor.threshold"
    title: str
    details: dict[str, Any] = field(default_factory=dict)
    severity: str = "error"  # "info", "warning", "error"
    at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))


@dataclass
class Delivery:
    destination: str
    delivered: bool
    attempts: int
    error: str = ""


def _split(name: str) -> list[str]:
    return [u.strip() for u in os.environ.get(name, "").split(",") if u.strip()]


def _redact(url: str) -> str:
    """Destinations may carry tokens in the URL: log the scheme and host only."""
    scheme, _, rest = url.partition("://")
    host = rest.split("/", 1)[0].rsplit("@", 1)[-1]
    return f"{scheme}://{host}/…"


def _post(url: str, payload: bytes) -> None:
    req = urllib.request.Request(url, data=payload, method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
        if resp.status >= 300:
            raise urllib.error.HTTPError(url, resp.status, "unexpected status", resp.headers, None)


def _apprise(url: str, alert: Alert) -> None:
    import apprise

    notifier = apprise.Apprise()
    if not notifier.add(url):
        raise ValueError("apprise does not understand this URL")
    body = "\n".join(f"{k}: {v}" for k, v in alert.details.items()) or alert.title
    if not notifier.notify(title=f"[conveyor] {alert.title}", body=body):
        raise RuntimeError("apprise reported a failed notification")


def _deliver(destination: str, send: Any) -> Delivery:
    error = ""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            send()
            return Delivery(_redact(destination), True, attempt)
        except Exception as exc:  # delivery must never raise into the pipeline
            error = f"{type(exc).__name__}: {exc}"
            if attempt < ATTEMPTS:
                time.sleep(BACKOFF_S * 2 ** (attempt - 1))
    logger.error("ALERT NOT DELIVERED to %s after %d attempts: %s", _redact(destination), ATTEMPTS, error)
    return Delivery(_redact(destination), False, ATTEMPTS, error)


def send_alert(alert: Alert, webhooks: list[str] | None = None, apprise_urls: list[str] | None = None) -> list[Delivery]:
    """Deliver ``alert`` to every configured destination, retrying; failures are logged, never raised."""
    webhooks = _split("CONVEYOR_ALERT_WEBHOOKS") if webhooks is None else webhooks
    apprise_urls = _split("CONVEYOR_ALERT_APPRISE") if apprise_urls is None else apprise_urls
    payload = json.dumps(asdict(alert), default=str).encode()
    deliveries = [_deliver(url, lambda url=url: _post(url, payload)) for url in webhooks]
    deliveries += [_deliver(url, lambda url=url: _apprise(url, alert)) for url in apprise_urls]
    if not deliveries:
        logger.warning("alert (no destination configured): %s %s", alert.kind, alert.title)
    return deliveries
