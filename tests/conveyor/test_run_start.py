"""The fixed cost of a run (issue 17): the local server's boot starts before the slow imports, and the
end of a flow run does not wait for Prefect's heartbeat thread. Figures: benchmarks/run_overhead.py."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

from tests.support import wait_for

REPO = Path(__file__).resolve().parents[2]


def test_the_server_boot_starts_before_the_run_imports_dask(tmp_path) -> None:
    """`conveyor run` asks for the API before it imports distributed (through conveyor.quiet): the
    boot is the longest wait of a first run, so it starts first."""
    probe = f"""
import os, sys
import conveyor.prefect_api as api
def ensure_api(home, port, wait=True):
    sys.stdout.write(",".join(m for m in ("conveyor.quiet", "distributed", "conveyor.flows.training")
                              if m in sys.modules))
    sys.stdout.flush()
    os._exit(0)
api.ensure_api = ensure_api
from conveyor.cli import main
main(["run", "--storage-url", {str(tmp_path / "store")!r}])
"""
    env = {"PATH": "/usr/bin:/bin", "PREFECT_HOME": str(tmp_path / "prefect"), "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == "", f"imported before the server was asked for: {done.stdout}"


def test_a_flow_run_does_not_wait_for_its_heartbeat_thread(monkeypatch) -> None:
    """Prefect 3.8's sync engine joins the heartbeat thread at the end of every flow run, and the thread
    notices its stop flag only between 1-s sleeps; tuned, the daemon thread ends on its own."""
    from prefect import flow_engine

    from conveyor.prefect_api import tune_flow_engine

    monkeypatch.setattr(flow_engine, "_send_heartbeats", flow_engine._send_heartbeats)  # undone after
    tune_flow_engine()
    tune_flow_engine()  # idempotent: one wrapper, not two

    sent = threading.Event()
    engine = SimpleNamespace(
        heartbeat_seconds=30,
        flow_run=None,
        logger=logging.getLogger("test"),
        _build_heartbeat_event_template=lambda: ({}, []),
        _emit_flow_run_heartbeat=lambda resource, related: sent.set(),
    )
    joined: list[str] = []
    real_join = threading.Thread.join

    def join(self, timeout=None):
        joined.append(self.name)
        return real_join(self, timeout)

    before = set(threading.enumerate())
    monkeypatch.setattr(threading.Thread, "join", join)
    with flow_engine._send_heartbeats(engine):
        assert sent.wait(10)  # the thread runs and sends
    monkeypatch.setattr(threading.Thread, "join", real_join)
    assert joined == []  # the flow's end did not wait for it
    assert flow_engine._send_heartbeats.func.__name__ == "_send_heartbeats"
    started = set(threading.enumerate()) - before
    assert len(started) == 1
    wait_for(lambda: not any(t.is_alive() for t in started), "the heartbeat thread to end", timeout=5)
