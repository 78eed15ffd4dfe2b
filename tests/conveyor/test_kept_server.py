"""The Prefect server a command leaves up: recorded in its Prefect home, stopped by its watchdog once idle,
or by `conveyor server stop`; a pid that is no longer the recorded process is never signalled.

A stand-in process plays the server (the watchdog and the stop only see a process group, a pid and its
identity; the real server is kept and stopped in tests/conveyor/test_cli.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from conveyor import prefect_api
from conveyor.prefect_api import PrefectApi, free_port, keep, kept_server, read_state, stop_kept


@pytest.fixture
def stand_in():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


def _gone(proc: subprocess.Popen, within_s: float) -> bool:
    try:
        proc.wait(timeout=within_s)
        return True
    except subprocess.TimeoutExpired:
        return False


def _watchdog_ended(state: dict, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if prefect_api._identity(state["watchdog"]["pid"]) is None:
            return True
        time.sleep(0.1)
    return False


def test_an_idle_kept_server_is_stopped_by_its_watchdog(tmp_path: Path, stand_in) -> None:
    api = PrefectApi(url=f"http://127.0.0.1:{free_port()}/api", started=stand_in)
    keep(api, tmp_path, minutes=0.1)  # 6 s without a run
    state = read_state(tmp_path)
    try:
        assert state and state["server"]["pid"] == stand_in.pid and kept_server(tmp_path) is not None
        assert api.started is None  # no longer this process's to stop
        deadline = time.monotonic() + 9
        while time.monotonic() < deadline:  # runs keep touching it: it stays up past its idle time
            prefect_api.touch(tmp_path, api.url)
            time.sleep(0.5)
        assert stand_in.poll() is None, "stopped while runs were using it"
        assert _gone(stand_in, within_s=20), "the watchdog did not stop the idle server"
        assert read_state(tmp_path) is None
        assert _watchdog_ended(state, within_s=10)
    finally:
        stop_kept(tmp_path)


def test_server_stop_ends_the_server_and_its_watchdog(tmp_path: Path, stand_in) -> None:
    api = PrefectApi(url=f"http://127.0.0.1:{free_port()}/api", started=stand_in)
    keep(api, tmp_path, minutes=30)
    state = read_state(tmp_path)
    try:
        assert stop_kept(tmp_path) == api.url
        assert _gone(stand_in, within_s=5)
        assert _watchdog_ended(state, within_s=10)
        assert read_state(tmp_path) is None and stop_kept(tmp_path) is None
    finally:
        stop_kept(tmp_path)


def test_a_pid_that_is_no_longer_the_recorded_process_is_never_signalled(tmp_path: Path, stand_in) -> None:
    api = PrefectApi(url=f"http://127.0.0.1:{free_port()}/api", started=stand_in)
    keep(api, tmp_path, minutes=None)  # kept until stopped: no watchdog
    state = read_state(tmp_path)
    assert state and state["watchdog"] is None
    state["server"]["created"] -= 3600  # as if the pid now belonged to another process
    prefect_api._write_state(tmp_path, state)
    assert kept_server(tmp_path) is None
    assert stop_kept(tmp_path) is None
    assert stand_in.poll() is None


def test_the_keep_setting_is_checked(monkeypatch) -> None:
    monkeypatch.setenv(prefect_api.KEEP_ENV, "forever")
    with pytest.raises(ValueError, match="CONVEYOR_KEEP_SERVER_MINUTES"):
        prefect_api.keep_minutes()
    monkeypatch.setenv(prefect_api.KEEP_ENV, "0")
    assert prefect_api.keep_minutes() == 0
    monkeypatch.delenv(prefect_api.KEEP_ENV)
    assert prefect_api.keep_minutes() == prefect_api.DEFAULT_KEEP_MINUTES
