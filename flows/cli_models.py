"""``conveyor`` commands for deployed models: serve, models, promote, rollback, score, monitor.

    conveyor models   [--model NAME] [--storage-url URL]
    conveyor promote  --model NAME --version V [--alias champion] [--expect V0] [--reason TEXT]
    conveyor rollback --model NAME [--to VERSION] [--storage-url URL]
    conveyor serve    [--model NAME] [--port 8000] [--poll-seconds 5]
    conveyor score    --input-url URL [--model NAME] [--cluster cpu]
    conveyor monitor  [--model NAME] [--data-url URL] [--max-auc-drop 0.05]

Storage credentials come from ``CONVEYOR_STORAGE_OPTIONS`` (never arguments)
and are never printed. Handlers import their heavy modules themselves so
``conveyor --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

DEFAULT_MODEL = "flights_late"


def _common(parser: argparse.ArgumentParser) -> None:
    from flows.params import DEFAULT_STORAGE

    parser.add_argument("--storage-url", default=DEFAULT_STORAGE, help="storage root (default: %(default)s)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name (default: %(default)s)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def _store(args: argparse.Namespace) -> Any:
    from flows.training import open_store

    return open_store(args.storage_url)


def add_commands(sub: Any) -> None:
    models = sub.add_parser("models", help="list a model's registered versions and aliases")
    _common(models)
    models.add_argument("--history", action="store_true", help="also print the champion's history")
    models.add_argument("--json", action="store_true", help="machine-readable output")
    models.set_defaults(handler=cmd_models)

    promote = sub.add_parser("promote", help="point an alias (default champion) at a registered version")
    _common(promote)
    promote.add_argument("--version", required=True, help="registered version to promote")
    promote.add_argument("--alias", default="champion", help="alias to move (default: %(default)s)")
    promote.add_argument("--expect", default=None,
                         help="only if the alias points at this version now (compare-and-swap); 'none' = unset")
    promote.add_argument("--reason", default="manual promotion", help="recorded in the alias history")
    promote.set_defaults(handler=cmd_promote)

    rollback = sub.add_parser("rollback", help="restore the previous champion (from the alias history)")
    _common(rollback)
    rollback.add_argument("--to", default=None, help="roll back to this registered version instead")
    rollback.add_argument("--alias", default="champion", help="alias to roll back (default: %(default)s)")
    rollback.add_argument("--reason", default="", help="recorded in the alias history")
    rollback.set_defaults(handler=cmd_rollback)

    serve = sub.add_parser("serve", help="serve the champion over HTTP, hot-reloading it when the alias moves")
    _common(serve)
    serve.add_argument("--alias", default="champion", help="alias to serve (default: %(default)s)")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    serve.add_argument("--poll-seconds", type=float, default=5.0, help="how often to check the alias (default: %(default)s)")
    serve.set_defaults(handler=cmd_serve)

    score = sub.add_parser("score", help="batch-score a committed dataset with the champion (Prefect flow on Dask)")
    _common(score)
    score.add_argument("--input-url", required=True, help="committed dataset version URL to score")
    score.add_argument("--version", default=None, help="model version (default: the champion)")
    score.add_argument("--output-name", default=None, help="predictions dataset name (default: predictions_<model>)")
    score.add_argument("--cluster", default="auto", help="auto | cpu | gpu | tcp://host:8786 (default: %(default)s)")
    score.add_argument("--n-workers", type=int, default=None, help="local Dask workers")
    score.add_argument("--prefect-port", type=int, default=4200, help="port of the local Prefect server")
    score.set_defaults(handler=cmd_score)

    monitor = sub.add_parser("monitor", help="check the live champion on labelled data; roll back on a breach")
    _common(monitor)
    monitor.add_argument("--data-url", default=None, help="recent labelled dataset (default: replay the holdout)")
    monitor.add_argument("--max-auc-drop", type=float, default=0.05, help="breach when AUC < card AUC minus this")
    monitor.add_argument("--no-rollback", action="store_true", help="alert only")
    monitor.add_argument("--cluster", default="auto", help="auto | cpu | gpu | tcp://host:8786 (default: %(default)s)")
    monitor.add_argument("--n-workers", type=int, default=None, help="local Dask workers")
    monitor.add_argument("--prefect-port", type=int, default=4200, help="port of the local Prefect server")
    monitor.set_defaults(handler=cmd_monitor)


def cmd_models(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from tasks.registry import alias_history, list_aliases, list_versions

    store = _store(args)
    versions = list_versions(store, args.model)
    aliases = list_aliases(store, args.model)
    history = alias_history(store, args.model) if args.history else []
    if args.json:
        print(json.dumps({"versions": [asdict(v) for v in versions], "aliases": {k: asdict(v) for k, v in aliases.items()},
                          "history": [asdict(e) for e in history]}, indent=2, default=str))
        return 0
    if not versions:
        print(f"no registered versions of {args.model} under {store.root}")
        return 0
    print(f"{'version':<18} {'registered':<26} {'roc_auc':>8}  aliases")
    for v in versions:
        auc = v.metrics.get("roc_auc")
        print(f"{v.version:<18} {v.registered_at:<26} {auc if auc is None else f'{auc:.4f}':>8}  {', '.join(v.aliases)}")
    for e in history:
        print(f"  #{e.seq:<4} {e.at}  {e.action:<8} {e.previous} -> {e.version}  by {e.by}: {e.reason}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from tasks.registry import ANY, set_alias

    expected: Any = ANY if args.expect is None else (None if args.expect.lower() == "none" else args.expect)
    event = set_alias(_store(args), args.model, args.alias, args.version, args.reason, expected=expected,
                      action="promote")
    print(f"{args.model}/{args.alias}: {event.previous} -> {event.version} (event #{event.seq})")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from tasks.registry import rollback

    event = rollback(_store(args), args.model, to=args.to, alias=args.alias, reason=args.reason)
    print(f"{args.model}/{args.alias}: rolled back {event.previous} -> {event.version} (event #{event.seq})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from flows.serve import serve

    serve(args.storage_url, args.model, args.alias, args.host, args.port, args.poll_seconds)
    return 0


def _with_prefect(port: int, run: Any) -> Any:
    """Run a flow against one Prefect API (configured, running, or started here and stopped after)."""
    from flows.api import drain_prefect, ensure_api, export
    from flows.cli import _prefect_home

    api = ensure_api(_prefect_home(), port)
    export(api)
    try:
        return run()
    finally:
        if api.started is not None:
            drain_prefect()
            api.stop()


def cmd_score(args: argparse.Namespace) -> int:
    def run() -> Any:
        from flows.scoring import ScoringParams, batch_scoring

        params = ScoringParams(input_url=args.input_url, storage_url=args.storage_url, model=args.model,
                               version=args.version, output_name=args.output_name, cluster=args.cluster,
                               n_workers=args.n_workers)
        return batch_scoring(params)

    result = _with_prefect(args.prefect_port, run)
    print(f"scored {result.rows:,} rows with {result.model} {result.model_version}; "
          f"{result.positive_rate:.1%} predicted late\n  predictions  {result.predictions.url}")
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    def run() -> Any:
        from flows.model_monitor import MonitorParams, model_monitor

        params = MonitorParams(storage_url=args.storage_url, model=args.model, data_url=args.data_url,
                               max_auc_drop=args.max_auc_drop, auto_rollback=not args.no_rollback,
                               cluster=args.cluster, n_workers=args.n_workers)
        return model_monitor(params)

    outcome = _with_prefect(args.prefect_port, run)
    print(f"monitor: {outcome.note}")
    return 3 if outcome.check.breached and not outcome.rolled_back else 0
