"""Every default of Conveyor, written once (a leaf: imports nothing of ours).

Paths are relative to the working directory, never to the installed package:
a non-editable install lives in site-packages, which is no place for data.
``make run`` and Prefect deployments run from the project folder
(``prefect.yaml`` sets the working directory), so ``data/`` lands there.
"""

from __future__ import annotations

import os
from pathlib import Path

# The storage root when none is given: CONVEYOR_STORAGE_URL, else ./data.
DEFAULT_STORAGE = os.environ.get("CONVEYOR_STORAGE_URL") or (Path.cwd() / "data").as_uri()
# The shipped pipeline spec `make run` runs (pipelines/flights.yaml).
DEFAULT_SPEC = "flights"
# The flagship model's registry name, and what any model name must look like.
DEFAULT_MODEL = "flights_late"
MODEL_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,62}$"
# The local Prefect server (API and UI) the CLI starts or reuses.
PREFECT_PORT = 4200
# `conveyor serve`.
SERVING_HOST = "127.0.0.1"
SERVING_PORT = 8000
SERVING_POLL_SECONDS = 5.0
# Server-side alert automations applied by `conveyor automations apply`.
AUTOMATIONS_FILE = Path("deployments") / "automations.yaml"


def prefect_home() -> Path:
    """Where the local Prefect server keeps its database (PREFECT_HOME, as Prefect reads it)."""
    return Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect")).expanduser()
