"""Operations commands: server-side alert automations, and the served setup on one machine.

conveyor automations apply [--file deployments/automations.yaml] [--webhook-url URL]
conveyor serve-local [--port 4200]
conveyor server status | stop
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conveyor.settings import AUTOMATIONS_FILE as DEFAULT_FILE
from conveyor.settings import PREFECT_PORT, prefect_home


def add_commands(sub: Any) -> None:
    auto = sub.add_parser(
        "automations", help="Prefect automations (server-side alerts) from deployments/automations.yaml"
    )
    auto_sub = auto.add_subparsers(dest="automations_command", required=True)
    apply = auto_sub.add_parser(
        "apply", help="create or update the automations through the Prefect API (idempotent)"
    )
    apply.add_argument("--file", default=str(DEFAULT_FILE), help="automations file (default: %(default)s)")
    apply.add_argument(
        "--webhook-url",
        default=None,
        help="where notifications go (default: the first URL of CONVEYOR_ALERT_WEBHOOKS)",
    )
    apply.set_defaults(handler=cmd_apply)

    serve = sub.add_parser(
        "serve-local", help="start a Prefect server, register the deployments and run a worker"
    )
    serve.add_argument(
        "--port", type=int, default=PREFECT_PORT, help="Prefect server port (default: %(default)s)"
    )
    serve.set_defaults(handler=cmd_serve_local)

    server = sub.add_parser("server", help="the local Prefect server a run left up for the UI (status, stop)")
    server_sub = server.add_subparsers(dest="server_command", required=True)
    server_sub.add_parser("status", help="is a kept server running, where, until when").set_defaults(
        handler=cmd_server_status
    )
    server_sub.add_parser("stop", help="stop the kept server and its idle watchdog now").set_defaults(
        handler=cmd_server_stop
    )


def cmd_server_status(args: argparse.Namespace) -> int:
    from conveyor.prefect_api import kept_for, kept_server

    home = prefect_home()
    state = kept_server(home)
    if state is None:
        print(f"no kept Prefect server for {home}")
        return 0
    until = kept_for(state.get("idle_minutes"))
    print(f"Prefect server {state['url'].removesuffix('/api')} (pid {state['server']['pid']}), up {until}")
    return 0


def cmd_server_stop(args: argparse.Namespace) -> int:
    from conveyor.prefect_api import stop_kept

    home = prefect_home()
    url = stop_kept(home)
    print(
        f"stopped the Prefect server at {url.removesuffix('/api')}"
        if url
        else f"no kept Prefect server for {home}"
    )
    return 0


@dataclass(frozen=True)
class Applied:
    name: str
    id: str
    action: str  # "created" or "updated"


def _webhook_url(given: str | None) -> str:
    url = given or next(
        (u.strip() for u in os.environ.get("CONVEYOR_ALERT_WEBHOOKS", "").split(",") if u.strip()), ""
    )
    if not url:
        raise ValueError("no webhook URL: pass --webhook-url or set CONVEYOR_ALERT_WEBHOOKS")
    return url


def load_spec(path: Path) -> dict[str, Any]:
    import yaml

    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict) or not spec.get("automations"):
        raise ValueError(f"{path}: expected a mapping with an 'automations' list")
    return spec


def save_block(spec: dict[str, Any], webhook_url: str) -> Any:
    """The notification block (a Custom Webhook), saved under its name; returns its document id."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    block_spec = spec.get("notification_block") or {}
    if block_spec.get("type", "custom-webhook") != "custom-webhook":
        raise ValueError(
            f"notification_block.type {block_spec.get('type')!r} is not supported (custom-webhook)"
        )
    name = block_spec.get("name", "conveyor-alerts")
    block = CustomWebhookNotificationBlock(
        name=name,
        url=webhook_url,
        method="POST",
        json_data=block_spec.get("json_data") or {"title": "{{subject}}", "body": "{{body}}"},
    )
    return block.save(name, overwrite=True)


def build_automations(spec: dict[str, Any], block_id: Any) -> list[Any]:
    """Validated prefect Automation objects: defaults merged in, a notification added to every automation."""
    from prefect.automations import Automation

    defaults = spec.get("defaults") or {}
    built = []
    for item in spec["automations"]:
        trigger = dict(item["trigger"])
        if "match_related" not in trigger and defaults.get("match_related"):
            trigger["match_related"] = defaults["match_related"]
        notify = {
            "type": "send-notification",
            "block_document_id": str(block_id),
            "subject": item.get("subject", defaults.get("subject", item["name"])),
            "body": item.get("body", defaults.get("body", item.get("description", ""))),
        }
        built.append(
            Automation.model_validate(
                {
                    "name": item["name"],
                    "description": item.get("description", ""),
                    "enabled": item.get("enabled", True),
                    "tags": ["conveyor"],
                    "trigger": trigger,
                    "actions": [*(item.get("actions") or []), notify],
                }
            )
        )
    return built


def apply_automations(path: Path = DEFAULT_FILE, webhook_url: str | None = None) -> list[Applied]:
    """Create the file's automations, or update those that exist by name (so re-applying changes nothing)."""
    from prefect.client.orchestration import get_client
    from prefect.events.schemas.automations import AutomationCore

    spec = load_spec(path)
    block_id = save_block(spec, _webhook_url(webhook_url))
    results = []
    with get_client(sync_client=True) as client:
        for automation in build_automations(spec, block_id):
            # Only what the file sets: prefect 3.8's update endpoint rejects fields it does not take
            # (owner_resource).
            core = AutomationCore.model_validate(
                automation.model_dump(exclude={"id", "owner_resource"}, exclude_unset=True)
            )
            existing = client.read_automations_by_name(automation.name)
            if existing:
                for extra in existing[1:]:  # an earlier non-idempotent apply left duplicates: keep one
                    client.delete_automation(extra.id)
                client.update_automation(existing[0].id, core)
                results.append(Applied(automation.name, str(existing[0].id), "updated"))
            else:
                results.append(Applied(automation.name, str(client.create_automation(core)), "created"))
    return results


def cmd_apply(args: argparse.Namespace) -> int:
    from conveyor.prefect_api import QUIET_ENV

    if not os.environ.get("PREFECT_API_URL"):
        print("conveyor: set PREFECT_API_URL to the Prefect server that should hold the automations")
        return 2
    os.environ.update({k: v for k, v in QUIET_ENV.items() if k not in os.environ})
    for item in apply_automations(Path(args.file), args.webhook_url):
        print(f"  {item.action:8} {item.name}  ({item.id})")
    from conveyor.policy import GPU_TAG, ensure_gpu_limit

    gpus = ensure_gpu_limit()
    print(
        f"  limit    {GPU_TAG}: {gpus} concurrent GPU stages"
        if gpus
        else f"  limit    {GPU_TAG}: none (no GPU here)"
    )
    return 0


def cmd_serve_local(args: argparse.Namespace) -> int:
    from conveyor.serve_local import serve_local

    return serve_local(prefect_home(), args.port)
