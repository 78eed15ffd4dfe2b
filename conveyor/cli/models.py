"""``conveyor`` commands for registered models: models, promote, rollback, serve.

    conveyor models   [--model NAME] [--storage-url URL]
    conveyor promote  --model NAME --version V [--alias champion] [--expect V0] [--reason TEXT]
    conveyor rollback --model NAME [--to VERSION] [--storage-url URL]
    conveyor serve    [--model NAME] [--port 8000] [--poll-seconds 5] [--workers N]
                      [--insecure-no-token]

Storage credentials come from ``CONVEYOR_STORAGE_OPTIONS`` (never arguments)
and are never printed. Handlers import their heavy modules themselves so
``conveyor --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from conveyor.cli import options
from conveyor.settings import SERVING_HOST, SERVING_POLL_SECONDS, SERVING_PORT


def _common(parser: argparse.ArgumentParser) -> None:
    options.storage(parser)
    options.model(parser)
    options.debug(parser)


def _store(args: argparse.Namespace) -> Any:
    from conveyor.resources import open_store

    return open_store(args.storage_url)


def add_commands(sub: Any) -> None:
    models = sub.add_parser("models", help="list a model's registered versions and aliases")
    _common(models)
    models.add_argument("--history", action="store_true", help="also print the champion's history")
    options.json_output(models)
    models.set_defaults(handler=cmd_models)

    promote = sub.add_parser("promote", help="point an alias (default champion) at a registered version")
    _common(promote)
    promote.add_argument("--version", required=True, help="registered version to promote")
    promote.add_argument("--alias", default="champion", help="alias to move (default: %(default)s)")
    promote.add_argument(
        "--expect",
        default=None,
        help="only if the alias points at this version now (compare-and-swap); 'none' = unset",
    )
    promote.add_argument("--reason", default="manual promotion", help="recorded in the alias history")
    promote.set_defaults(handler=cmd_promote)

    rollback = sub.add_parser("rollback", help="restore the previous champion (from the alias history)")
    _common(rollback)
    rollback.add_argument("--to", default=None, help="roll back to this registered version instead")
    rollback.add_argument("--alias", default="champion", help="alias to roll back (default: %(default)s)")
    rollback.add_argument("--reason", default="", help="recorded in the alias history")
    rollback.set_defaults(handler=cmd_rollback)

    serve = sub.add_parser(
        "serve", help="serve the champion over HTTP, hot-reloading it when the alias moves"
    )
    _common(serve)
    serve.add_argument("--alias", default="champion", help="alias to serve (default: %(default)s)")
    serve.add_argument("--host", default=SERVING_HOST, help="bind address (default: %(default)s)")
    serve.add_argument("--port", type=int, default=SERVING_PORT, help="port (default: %(default)s)")
    serve.add_argument(
        "--poll-seconds",
        type=float,
        default=SERVING_POLL_SECONDS,
        help="how often to check the alias (default: %(default)s)",
    )
    serve.add_argument(
        "--workers",
        type=_workers,
        default=None,
        help="server processes sharing the port (default: one per core)",
    )
    serve.add_argument(
        "--insecure-no-token",
        action="store_true",
        help="serve without CONVEYOR_SERVING_TOKEN (anyone who can connect may predict); loopback hosts only",
    )
    serve.set_defaults(handler=cmd_serve)


def cmd_models(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from conveyor.store.registry import alias_history, list_aliases, list_versions

    store = _store(args)
    versions = list_versions(store, args.model)
    aliases = list_aliases(store, args.model)
    history = alias_history(store, args.model) if args.history else []
    if args.json:
        print(
            json.dumps(
                {
                    "versions": [asdict(v) for v in versions],
                    "aliases": {k: asdict(v) for k, v in aliases.items()},
                    "history": [asdict(e) for e in history],
                },
                indent=2,
                default=str,
            )
        )
        return 0
    if not versions:
        print(f"no registered versions of {args.model} under {store.root}")
        return 0
    print(f"{'version':<18} {'registered':<26} {'roc_auc':>8}  aliases")
    for v in versions:
        auc = v.metrics.get("roc_auc")
        print(
            f"{v.version:<18} {v.registered_at:<26} {auc if auc is None else f'{auc:.4f}':>8}  "
            f"{', '.join(v.aliases)}"
        )
    for e in history:
        print(f"  #{e.seq:<4} {e.at}  {e.action:<8} {e.previous} -> {e.version}  by {e.by}: {e.reason}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from conveyor.store.registry import ANY, set_alias

    expected: Any = ANY if args.expect is None else (None if args.expect.lower() == "none" else args.expect)
    event = set_alias(
        _store(args), args.model, args.alias, args.version, args.reason, expected=expected, action="promote"
    )
    print(f"{args.model}/{args.alias}: {event.previous} -> {event.version} (event #{event.seq})")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from conveyor.store.registry import rollback

    event = rollback(_store(args), args.model, to=args.to, alias=args.alias, reason=args.reason)
    print(f"{args.model}/{args.alias}: rolled back {event.previous} -> {event.version} (event #{event.seq})")
    return 0


def _workers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"a number of processes (1 or more), not {text!r}")
    return value


def cmd_serve(args: argparse.Namespace) -> int:
    from conveyor.serving import serve

    serve(
        args.storage_url,
        args.model,
        args.alias,
        args.host,
        args.port,
        args.poll_seconds,
        insecure_no_token=args.insecure_no_token,
        workers=args.workers,
    )
    return 0
