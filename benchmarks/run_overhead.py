"""The fixed cost of a run: `conveyor run` on a fresh store, the same command again, and the plain script.

    python -m benchmarks.run_overhead [--json PATH] [--prefect-port 4260]

All are fresh processes timed by wall clock in one sitting (these machines are noisy: compare the
ratios, not the seconds). The first run starts the local Prefect API (a fresh Prefect home) and a Dask
cluster and computes every stage; the rerun finds every stage committed and reuses it; the last rerun
finds a Prefect server already running (as with `make ui` open) and skips starting one.
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
    try:
        plain_s, _ = _timed([sys.executable, "-m", "benchmarks.plain_pandas_xgboost"], env)
        first_s, first_out = _timed(run, env)
        rerun_s, rerun_out = _timed(run, env)
        # The same rerun while a Prefect server is already up (`make ui` open in another terminal).
        from conveyor.prefect_api import start_server

        home = work / "prefect"
        api = start_server(home, args.prefect_port, home / "server.log")
        try:
            warm_s, warm_out = _timed(run, env)
        finally:
            api.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {
        "seconds": {
            "plain_script": round(plain_s, 2),
            "first_run": round(first_s, 2),
            "rerun": round(rerun_s, 2),
            "rerun_server_running": round(warm_s, 2),
        },
        "stages": {
            "first_run": _stage_seconds(first_out),
            "rerun": _stage_seconds(rerun_out),
            "rerun_server_running": _stage_seconds(warm_out),
        },
        "first_run_vs_plain": round(first_s / plain_s, 2),
        "rerun_vs_first_run": round(rerun_s / first_s, 3),
        "rerun_server_running_vs_first_run": round(warm_s / first_s, 3),
        "goals": {"first_run_vs_plain": "<= 3", "rerun_vs_first_run": "<= 0.25"},
        "cpus": os.cpu_count(),
    }
    return emit(out, args.json)


if __name__ == "__main__":
    main()
