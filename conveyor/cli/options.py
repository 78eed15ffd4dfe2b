"""Options shared by several commands, declared once (defaults come from conveyor.settings)."""

from __future__ import annotations

import argparse

from conveyor.settings import DEFAULT_MODEL, DEFAULT_STORAGE, PREFECT_PORT


def storage(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage-url", default=DEFAULT_STORAGE, help="storage root (default: %(default)s)")


def model(parser: argparse.ArgumentParser, default: str | None = DEFAULT_MODEL) -> None:
    parser.add_argument("--model", default=default, help="model name in the registry (default: %(default)s)")


def cluster(parser: argparse.ArgumentParser, default: str | None = "auto") -> None:
    parser.add_argument(
        "--cluster", default=default, help="auto | cpu | gpu | tcp://host:8786 (default: %(default)s)"
    )
    parser.add_argument(
        "--n-workers", type=int, default=None, help="local Dask workers (default: by cores/GPUs)"
    )


def prefect(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prefect-port",
        type=int,
        default=PREFECT_PORT,
        help="port of the local Prefect server (default: %(default)s)",
    )


def debug(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def json_output(parser: argparse.ArgumentParser, help: str = "machine-readable output") -> None:
    parser.add_argument("--json", action="store_true", help=help)
