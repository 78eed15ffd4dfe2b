"""Run a Prefect flow from a command line against one Prefect API.

The CLI and every flow file's ``__main__`` go through here, so the flow, the
Dask workers and the API agree: ``PREFECT_API_URL`` when set, else a local
server already listening, else one started here (and stopped after, unless
asked to keep it). Prefect itself is imported only after the URL is exported.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from conveyor.settings import PREFECT_PORT, prefect_home


@dataclass(frozen=True)
class Launched:
    result: Any
    ui_url: str
    started_here: bool  # this call started the Prefect server
    kept: bool = False  # ... and left it running (conveyor.prefect_api.keep)
    idle_minutes: float | None = None  # the kept server stops after this many idle minutes (None: never)


def with_prefect(
    run: Callable[[], Any],
    port: int = PREFECT_PORT,
    keep_server: bool | None = None,
    prepare: Callable[[bool], Any] | None = None,
) -> Launched:
    """Call ``run`` (a flow) with one Prefect API exported for this process and its children.

    A server this call must start boots while ``prepare(booting)`` runs (imports, parameter checks:
    seconds of work that need no API; ``booting`` says a server is starting, so there is time to spare
    until it answers), and ``run`` starts once it answers. Afterwards that server stays up for the
    UI and the next command (whose start then skips the boot) until it has been idle for
    CONVEYOR_KEEP_SERVER_MINUTES (default 30; 0 stops it when the command ends); ``keep_server`` True
    keeps it until ``conveyor server stop``, False stops it now. Output is kept quiet (conveyor.quiet):
    a user error is logged without a traceback.
    """
    from conveyor.prefect_api import (
        drain_prefect,
        ensure_api,
        export,
        healthy,
        keep,
        keep_minutes,
        touch,
        tune_flow_engine,
    )

    minutes = keep_minutes()  # a bad setting fails before a server starts
    home = prefect_home()
    api = ensure_api(home, port, wait=False)  # first: the boot is the longest wait of a first run
    started_here = api.started is not None
    kept = started_here and (keep_server or (keep_server is None and minutes > 0))
    idle = None if keep_server else minutes
    export(api)
    from conveyor import quiet  # imports distributed: 0.3 s the server boot no longer waits for

    quiet.install()
    try:
        tune_flow_engine()
        if prepare is not None:
            prepare(started_here)  # a bad parameter fails here, before any flow run: reported by the caller
        api.wait_ready()
        try:
            result = run()
        except Exception as exc:
            quiet.mark_logged(exc)  # the flow engine logged it
            raise
    finally:
        if started_here:
            alive = api.started is not None and api.started.poll() is None and healthy(api.url)
            if alive:
                drain_prefect()
            if alive and kept:
                keep(api, home, idle)
            else:
                api.stop()
        else:
            touch(home, api.url)  # a kept server's idle time starts again
    return Launched(result, api.ui_url, started_here, kept, idle if kept else None)


def _scalar(annotation: Any) -> type | None:
    """The argparse type of a simple field (str, int, float, a Literal, optionally ``| None``), else None."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kinds = {_scalar(a) for a in args}
        return kinds.pop() if len(kinds) == 1 else None
    if typing.get_origin(annotation) is typing.Literal:
        return type(args[0])
    if typing.get_origin(annotation) is typing.Annotated:
        return _scalar(args[0])
    return annotation if annotation in (str, int, float) else None


def params_parser(model: type[BaseModel], description: str) -> argparse.ArgumentParser:
    """A parser whose options are the model's simple fields (the rest through ``--params-json``)."""
    parser = argparse.ArgumentParser(description=description)
    for name, info in model.model_fields.items():
        kind = _scalar(info.annotation)
        if kind is None:
            continue
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=kind,
            default=None,
            required=info.is_required(),
            help=(f"{info.title or name}: {info.description or ''}".rstrip(": ").replace("%", "%%"))
            + (f" (default: {default})" if default is not None else ""),
        )
    parser.add_argument("--params-json", default=None, help="JSON file of further parameters")
    parser.add_argument("--prefect-port", type=int, default=PREFECT_PORT, help="local Prefect server port")
    return parser


def parse_params(model: type[BaseModel], args: argparse.Namespace) -> BaseModel:
    values: dict[str, Any] = {}
    if args.params_json:
        values.update(json.loads(Path(args.params_json).read_text()))
    values.update({k: v for k, v in vars(args).items() if k in model.model_fields and v is not None})
    return model(**values)


def flow_main(flow: Callable[[Any], Any], model: type[BaseModel], argv: Sequence[str] | None = None) -> int:
    """``python -m conveyor.flows.<name>``: parse the flow's parameter model, run it, print the result.

    A user error (bad parameters, input or spec) ends with one line and a hint, a bug with its traceback.
    """
    from conveyor import quiet

    parser = params_parser(model, (flow.__doc__ or "").strip().split("\n")[0])
    args = parser.parse_args(argv)
    try:
        params = parse_params(model, args)
        launched = with_prefect(lambda: flow(params), args.prefect_port)
    except Exception as exc:
        return quiet.report(exc, prog=parser.prog)
    print(launched.result)
    return 0
