"""``conveyor serve-local``: Prefect server + work pool + deployments + worker, on this machine."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any


def add_commands(sub: Any) -> None:
    serve = sub.add_parser("serve-local", help="start a Prefect server, register the deployments and run a worker")
    serve.add_argument("--port", type=int, default=4200, help="Prefect server port (default: %(default)s)")
    serve.set_defaults(handler=cmd_serve_local)


def cmd_serve_local(args: argparse.Namespace) -> int:
    from flows.local_server import serve_local

    home = Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect")).expanduser()
    return serve_local(home, args.port)
