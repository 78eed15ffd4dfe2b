"""Alerts: one function every flow, hook and server calls; delivery never fails the pipeline.

Destinations come from the environment (never from code or parameters):
``CONVEYOR_ALERT_WEBHOOKS`` (comma-separated URLs receiving a JSON POST) and
``CONVEYOR_ALERT_APPRISE`` (comma-separated apprise URLs: Slack, email, ...).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

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
    at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))


@dataclass
class Delivery:
    destination: str
    delivered: bool
    attempts: int
    error: str = ""


def _split(name: str) -> list[str]:
    return [u.strip() for u in os.environ.get(name, "").split(",") if u.strip()]


def _redact(url: str) -> str:
    """How a destination is named in logs and reports: never a secret it carries.

    Webhooks (``http``/``https``) show their scheme and host name. Apprise URLs
    keep secrets anywhere, the host part included (``tgram://123:SECRET/chat``,
    ``slack://TokenA/TokenB/TokenC``), so only their scheme is shown. A short
    digest of the whole URL tells destinations apart without revealing them.
    """
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower() if sep and scheme.isascii() and scheme.isalnum() else "?"
    digest = hashlib.sha256(url.encode("utf-8", "replace")).hexdigest()[:8]
    if scheme in {"http", "https"}:
        try:
            host = urlsplit(url).hostname or "?"
        except ValueError:
            host = "?"
        return f"{scheme}://{host}/… [{digest}]"
    return f"{scheme}://… [{digest}]"


def _post(url: str, payload: bytes) -> None:
    req = urllib.request.Request(
        url, data=payload, method="POST", headers={"Content-Type": "application/json"}
    )
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


def send_alert(
    alert: Alert, webhooks: list[str] | None = None, apprise_urls: list[str] | None = None
) -> list[Delivery]:
    """Deliver ``alert`` to every configured destination, retrying; failures are logged, never raised."""
    webhooks = _split("CONVEYOR_ALERT_WEBHOOKS") if webhooks is None else webhooks
    apprise_urls = _split("CONVEYOR_ALERT_APPRISE") if apprise_urls is None else apprise_urls
    payload = json.dumps(asdict(alert), default=str).encode()
    deliveries = [_deliver(url, lambda url=url: _post(url, payload)) for url in webhooks]
    deliveries += [_deliver(url, lambda url=url: _apprise(url, alert)) for url in apprise_urls]
    if not deliveries:
        logger.warning("alert (no destination configured): %s %s", alert.kind, alert.title)
    return deliveries


# --- Prefect flow-run state hooks ---------------------------------------------------------

# The stage each running flow is in, so a failure alert can name it (set by the flow, read by the hooks).
_CURRENT_STAGE: dict[str, str] = {}


def mark_stage(flow_run_id: str, stage: str | None) -> None:
    """Record the stage ``flow_run_id`` is running (None: the run left its stages)."""
    if stage is None:
        _CURRENT_STAGE.pop(flow_run_id, None)
    else:
        _CURRENT_STAGE[flow_run_id] = stage


def run_url(flow_run_id: str) -> str:
    """A link to the run in the Prefect UI (PREFECT_UI_URL, else the API URL without ``/api``)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    ui = PREFECT_UI_URL.value() or (PREFECT_API_URL.value() or "").removesuffix("/").removesuffix("/api")
    return f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}" if ui else ""


def _error_of(state: Any) -> str:
    try:
        data = state.result(raise_on_failure=False)
    except Exception as exc:  # the result itself may be unreadable (crash, lost storage)
        data = exc
    if isinstance(data, BaseException):
        return f"{type(data).__name__}: {data}"
    return str(state.message or state.name or "")


def flow_run_alert(kind: str, flow: Any, flow_run: Any, state: Any) -> Alert:
    """The alert for a flow run that ended ``kind`` ("failed", "crashed", "cancelled")."""
    run_id = str(flow_run.id)
    stage = _CURRENT_STAGE.get(run_id, "") or getattr(_error_stage(state), "stage", "")
    error = _error_of(state)
    where = f" in stage {stage}" if stage else ""
    return Alert(
        kind=f"flow.{kind}",
        title=f"{flow.name} run {flow_run.name} {kind}{where}",
        details={
            "flow": flow.name,
            "flow_run_id": run_id,
            "flow_run_name": flow_run.name,
            "stage": stage,
            "state": state.name,
            "error": error[:2000],
            "url": run_url(run_id),
        },
        severity="warning" if kind == "cancelled" else "error",
    )


def _error_stage(state: Any) -> Any:
    try:
        return state.result(raise_on_failure=False)
    except Exception:
        return None


def _hook(kind: str):
    def hook(flow: Any, flow_run: Any, state: Any) -> None:
        try:
            alert = flow_run_alert(kind, flow, flow_run, state)
            deliveries = send_alert(alert)
            delivered = sum(d.delivered for d in deliveries)
            logger.info("alert %s sent to %d of %d destinations", alert.kind, delivered, len(deliveries))
        except Exception:  # a hook must never turn one failure into two
            logger.exception("ALERT NOT DELIVERED: building the %s alert failed", kind)
        finally:
            mark_stage(str(flow_run.id), None)

    hook.__name__ = f"alert_on_{kind}"
    return hook


on_failure = _hook("failed")
on_crashed = _hook("crashed")
on_cancellation = _hook("cancelled")
