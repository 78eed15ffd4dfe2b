"""Run a command and report its wall time and the peak RSS of its whole process tree (Dask workers included).

    python -m benchmarks.peak_rss [--json PATH] -- conveyor run --source-url DIR --storage-url DIR ...

Used for the 100M-row flow run in benchmarks/README.md. The command's own output
passes through; one JSON line is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.scale import PeakRss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    # Stopped by `timeout` (SIGTERM) or Ctrl-C: interrupt the command so it shuts its cluster and server down,
    # and still print what was measured.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with PeakRss() as rss:
        started = time.perf_counter()
        proc = subprocess.Popen(command)
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            try:
                code = proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.terminate()
                code = proc.wait(timeout=30)
        seconds = time.perf_counter() - started
    result = {
        "command": command,
        "returncode": code,
        "seconds": round(seconds, 1),
        "peak_rss_gib": round(rss.peak / 2**30, 2),
        "largest_processes": rss.top(),
    }
    print(json.dumps(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return code


if __name__ == "__main__":
    sys.exit(main())
