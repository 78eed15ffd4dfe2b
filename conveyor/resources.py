"""Resources stages receive from the edge: stores (fsspec), Dask clients, the GPU count.

fsspec options for a URL, from the environment only (credentials never live in code, params or logs).

``CONVEYOR_STORAGE_OPTIONS`` is JSON: either one options object for every
store, e.g. ``{"endpoint_url": "http://minio:9000", "key": "…", "secret": "…"}``,
or a mapping from URL prefix to options, e.g.
``{"s3://prod/": {...}, "s3://backup/": {...}}`` (longest matching prefix wins).
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from conveyor.store.storage import Store

if TYPE_CHECKING:
    from distributed import Client

ENV = "CONVEYOR_STORAGE_OPTIONS"


def _load() -> dict[str, Any]:
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{ENV} is not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(options, dict):
        raise ValueError(f"{ENV} must be a JSON object")
    return options


def options_for(url: str) -> dict[str, Any]:
    options = _load()
    if options and all("://" in key for key in options):
        matches = [prefix for prefix in options if url.startswith(prefix)]
        return dict(options[max(matches, key=len)]) if matches else {}
    return options


def open_store(url: str) -> Store:
    return Store.from_url(url, options_for(url))


def dask_client(address: str) -> Client:
    """A client to the flow's cluster, the default for dask calls inside the stage while open."""
    from distributed import Client

    return Client(address, timeout=60)


def gpu_count() -> int:
    """CUDA devices visible to this process (0 without a driver or NVML)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no library, no device: a CPU worker
        return 0
