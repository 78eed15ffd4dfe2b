"""``conveyor`` command line.

    conveyor run [--storage-url URL] [--cluster auto|cpu|gpu|tcp://...] [--max-rows N] [--summary-json PATH]

Every command lives in one of the modules of the table below; each module's
``add_commands`` adds its parsers with ``set_defaults(handler=...)``, and
handlers import heavy modules themselves so ``conveyor --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from conveyor.cli import models, ops, runs, storage

# The command table: module -> the commands it adds.
COMMAND_GROUPS = (
    (runs, "run, score, monitor: flows on a Dask cluster, recorded by Prefect"),
    (models, "models, promote, rollback, serve: the registry and the HTTP API"),
    (storage, "verify, gc, backup, restore: the storage root"),
    (ops, "automations, serve-local: operations"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conveyor", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for module, _ in COMMAND_GROUPS:
        module.add_commands(sub)
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
