"""What the benchmark scripts share: synthetic data on disk once, and printing/saving their JSON result."""

from __future__ import annotations

import json
from pathlib import Path


def synthetic_source(work: Path, rows: int) -> Path:
    """``work/synth-<rows>``: generated once (benchmarks/synth.py, not timed), reused when present."""
    from benchmarks.synth import generate

    source = work / f"synth-{rows}"
    if not (source / "airports.parquet").exists():
        generate(str(source), rows, progress=False)
    return source


def emit(out: dict, path: Path | None) -> dict:
    """Print the result as indented JSON and write it to ``path`` when given."""
    text = json.dumps(out, indent=2)
    print(text)
    if path:
        Path(path).write_text(text)
    return out
