"""The fixed cost of a run: `conveyor run` on a fresh store, the same command again, and the plain script.

    python -m benchmarks.run_overhead [--json PATH] [--prefect-port 4260]

All are fresh processes timed by wall clock in one sitting (these machines are noisy: compare the
ratios, not the seconds). The first run starts the local Prefect API (a fresh Prefect home) and a Dask
cluster and computes every stage, and leaves the server up (the default, CONVEYOR_KEEP_SERVER_MINUTES);
the rerun finds that server and every stage committed. The cold rerun is the same after
`conveyor server stop`, with the server stopped at its end (CONVEYOR_KEEP_SERVER_MINUTES=0): a server
boot on the critical path.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import emit


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return seconds, proc.stdout


def _stage_seconds(stdout: str) -> dict[str, float]:
    line = next((ln for ln in stdout.splitlines() if ln.strip().startswith("stage seconds")), "")
    words = line.split()[2:]
    return {k: float(v) for k, v in zip(words[::2], words[1::2], strict=False)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--prefect-port", type=int, default=4260)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="conveyor-overhead-"))
    env = os.environ.copy() | {
        "PREFECT_HOME": str(work / "prefect"),
        "CONVEYOR_ALLOWED_STORAGE_PREFIXES": str(work),
    }
    env.pop("PREFECT_API_URL", None)
    store = str(work / "store")
    run = [
        sys.executable,
        "-m",
        "conveyor",
        "run",
        "--storage-url",
        store,
        "--prefect-port",
        str(args.prefect_port),
    ]
    stop = [sys.executable, "-m", "conveyor", "server", "stop"]
    try:
        plain_s, _ = _timed([sys.executable, "-m", "benchmarks.plain_pandas_xgboost"], env)
        first_s, first_out = _timed(run, env)
        rerun_s, rerun_out = _timed(run, env)
        _timed(stop, env)
        cold_s, cold_out = _timed(run, env | {"CONVEYOR_KEEP_SERVER_MINUTES": "0"})
    finally:
        subprocess.run(stop, env=env, capture_output=True, timeout=120)  # nothing left listening
        shutil.rmtree(work, ignore_errors=True)
    out = {
        "seconds": {
            "plain_script": round(plain_s, 2),
            "first_run": round(first_s, 2),
            "rerun": round(rerun_s, 2),
            "rerun_cold_server": round(cold_s, 2),
        },
        "stages": {
            "first_run": _stage_seconds(first_out),
            "rerun": _stage_seconds(rerun_out),
            "rerun_cold_server": _stage_seconds(cold_out),
        },
        "first_run_vs_plain": round(first_s / plain_s, 2),
        "rerun_vs_first_run": round(rerun_s / first_s, 3),
        "rerun_cold_server_vs_first_run": round(cold_s / first_s, 3),
        "goals": {"first_run_vs_plain": "<= 3", "rerun_vs_first_run": "<= 0.25"},
        "cpus": os.cpu_count(),
    }
    return emit(out, args.json)


if __name__ == "__main__":
    main()
