"""One Prefect API for the flow and every Dask worker.

Without ``PREFECT_API_URL`` each Dask worker *process* would start its own
temporary API on the same SQLite file (slow, and ``database is locked``).
So the CLI uses ``PREFECT_API_URL`` when it is set, else reuses a local
``prefect server`` already listening (checked to be one: see
:func:`is_prefect_server`), else starts one and stops it on exit.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from conveyor.settings import PREFECT_PORT as DEFAULT_PORT

START_TIMEOUT_S = 180.0

# Set for every process we start or configure: no telemetry calls from a machine with no internet.
QUIET_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_CLI_PROMPT": "false",
}


@dataclass
class PrefectApi:
    url: str  # .../api
    started: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def ui_url(self) -> str:
        return self.url.removesuffix("/api")

    def stop(self) -> None:
        """Stop the server we started (its whole process group); a reused one is left alone."""
        proc, self.started = self.started, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> PrefectApi:
        """Wait until the server answers (at once for a server found running); stop it if it never does."""
        proc = self.started
        if proc is None:
            return self
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited with code {proc.returncode}; see {self.log_path}")
            if healthy(self.url, timeout=1.0):
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(
            f"prefect server did not answer on {self.url} within {timeout_s:.0f}s; see {self.log_path}"
        )


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _get_json(url: str, timeout: float) -> object:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        if resp.status != 200:
            return None
        return json.loads(resp.read(4096))


def is_prefect_server(api_url: str, timeout: float = 2.0) -> bool:
    """Whether ``api_url`` is a Prefect server this client can use, not merely something answering 200.

    Three answers only a Prefect server gives: ``/health`` is JSON ``true``,
    ``/version`` is the REST API version this client speaks
    (``prefect.client.constants.SERVER_API_VERSION``, the marker), and
    ``/admin/version`` is a Prefect release of the same major.minor as ours.
    """
    # Without importing prefect: an import before export() sets PREFECT_API_URL would pin this
    # process to a temporary server of its own (seen: runs missing from the --prefect-port server).
    ours, marker = _client_versions()
    base = api_url.rstrip("/")
    try:
        if _get_json(f"{base}/health", timeout) is not True:
            return False
        if _get_json(f"{base}/version", timeout) != marker:
            return False
        release = _get_json(f"{base}/admin/version", timeout)
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return isinstance(release, str) and release.split(".")[:2] == ours.split(".")[:2]


def _client_versions() -> tuple[str, str]:
    """(installed prefect release, the REST API version its client speaks), read without importing it."""
    import importlib.metadata
    import importlib.util
    import re

    release = importlib.metadata.version("prefect")
    spec = importlib.util.find_spec("prefect")
    constants = Path(spec.origin).parent / "client" / "constants.py" if spec and spec.origin else None
    text = constants.read_text() if constants and constants.exists() else ""
    found = re.search(r'^SERVER_API_VERSION\s*=\s*"([^"]+)"', text, re.M)
    return release, found.group(1) if found else ""


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def template_db() -> Path:
    """A migrated Prefect database with the block types registered and no runs, for this Prefect
    release and these installed Prefect collections, kept with the installed packages.

    A fresh Prefect home otherwise runs every Alembic migration at server start (measured: 10.0 s to
    the first answer against 4.3 s from a copy of this file) and registers every block type (1.0 s
    more); ``make`` builds it once per install (``python -m conveyor.prefect_api template``), like
    compiled bytecode. Another release or another set of collections is another file.
    """
    import hashlib
    import importlib.metadata

    release, _ = _client_versions()
    collections = sorted(
        f"{e.name}={e.value}@{e.dist.version if e.dist else ''}"
        for e in importlib.metadata.entry_points(group="prefect.collections")
    )
    key = hashlib.sha256("\n".join(collections).encode()).hexdigest()[:12]
    return Path(sys.prefix) / "share" / "conveyor" / f"prefect-{release}-{key}.db"


# Run in the template's Prefect home: what a server start does when it registers block types.
_REGISTER_BLOCKS = """
import asyncio
import prefect.plugins
from prefect.server.database import provide_database_interface
from prefect.server.models.block_registration import run_block_auto_registration

async def main():
    prefect.plugins.load_prefect_collections()
    session = await provide_database_interface().session()
    async with session:
        await run_block_auto_registration(session=session)

asyncio.run(main())
"""


def build_template(path: Path | None = None) -> Path:
    """Migrate an empty database with ``prefect server database upgrade``, register the block types in
    it as a server start would, and publish it at ``path``."""
    import tempfile

    path = path or template_db()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="prefect-template-", dir=path.parent) as tmp:
        env = os.environ.copy() | QUIET_ENV | {"PREFECT_HOME": tmp}
        for name in (
            "PREFECT_API_URL",
            "PREFECT_API_DATABASE_CONNECTION_URL",
            "PREFECT_SERVER_DATABASE_CONNECTION_URL",
        ):
            env.pop(name, None)
        for step in (["-m", "prefect", "server", "database", "upgrade", "-y"], ["-c", _REGISTER_BLOCKS]):
            subprocess.run(
                [sys.executable, *step], env=env, check=True, capture_output=True, timeout=START_TIMEOUT_S
            )
        os.replace(Path(tmp) / "prefect.db", path)  # atomic: a half-written template is never seen
    return path


def _seed_database(home: Path) -> bool:
    """Give a fresh home the migrated template (when built and the database is the default SQLite file);
    True when it did."""
    if any(
        os.environ.get(n)
        for n in ("PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL")
    ):
        return False
    target, template = home / "prefect.db", template_db()
    if target.exists() or not template.is_file():
        return False
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    shutil.copyfile(template, partial)
    os.replace(partial, target)
    return True


def start_server(home: Path, port: int, log_path: Path, wait: bool = True) -> PrefectApi:
    """Start ``prefect server`` on loopback in its own process group; wait until it answers unless
    ``wait`` is False (then the caller does other work first and calls :meth:`PrefectApi.wait_ready`)."""
    home.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    seeded = _seed_database(home)
    env = os.environ.copy() | QUIET_ENV | {"PREFECT_HOME": str(home)}
    if seeded:  # the template is this release's head with its block types: skip Alembic's check
        # (0.3-0.8 s of boot) and the block registration (1.0 s); a later start of this home does both
        env["PREFECT_SERVER_DATABASE_MIGRATE_ON_START"] = "false"
        env["PREFECT_SERVER_REGISTER_BLOCKS_ON_START"] = "false"
    env.pop("PREFECT_API_URL", None)
    # The UI asks this URL for its API; without it a server on any port but 4200 shows "Can't connect".
    env["PREFECT_UI_API_URL"] = f"http://127.0.0.1:{port}/api"
    url = f"http://127.0.0.1:{port}/api"
    log = open(log_path, "ab")  # noqa: SIM115 (handed to the child process, closed right after)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--analytics-off",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    log.close()
    api = PrefectApi(url=url, started=proc, log_path=log_path)
    return api.wait_ready() if wait else api


def ensure_api(home: Path, port: int = DEFAULT_PORT, wait: bool = True) -> PrefectApi:
    """The API URL to use, starting a local server if nothing is configured or listening (without
    waiting for it to answer when ``wait`` is False: see :meth:`PrefectApi.wait_ready`)."""
    configured = os.environ.get("PREFECT_API_URL")
    if configured:
        if not healthy(configured, timeout=10):
            raise RuntimeError(f"PREFECT_API_URL={configured} does not answer /health")
        return PrefectApi(url=configured)
    kept = kept_server(home)  # one server per Prefect home (its SQLite file), whatever port it took
    if kept is not None and is_prefect_server(kept["url"]):
        return PrefectApi(url=kept["url"])
    local = f"http://127.0.0.1:{port}/api"
    if is_prefect_server(local):  # adopt only a Prefect server; serve-local deploys and runs a worker on it
        return PrefectApi(url=local)
    if not _port_free(port):
        port = free_port()  # something else holds the port: ours goes elsewhere
    return start_server(home, port, home / "server.log", wait=wait)


# A server a command started and left running (for the UI and the next run's fast start) is recorded
# here, in its Prefect home, with the watchdog that stops it once idle. `conveyor server stop` ends both.
STATE_FILE = "conveyor-server.json"
KEEP_ENV = "CONVEYOR_KEEP_SERVER_MINUTES"
DEFAULT_KEEP_MINUTES = 30.0
WATCH_POLL_S = 15.0
_DETACHED: list[subprocess.Popen] = []


def keep_minutes() -> float:
    """How long a server a command started stays up after the last run (CONVEYOR_KEEP_SERVER_MINUTES,
    default 30; 0 stops it when the command ends)."""
    raw = os.environ.get(KEEP_ENV, "").strip()
    if not raw:
        return DEFAULT_KEEP_MINUTES
    try:
        minutes = float(raw)
    except ValueError:
        minutes = -1.0
    if not 0 <= minutes <= 7 * 24 * 60:
        raise ValueError(f"{KEEP_ENV}={raw!r}: give minutes between 0 and 10080 (0: stop after each command)")
    return minutes


def kept_for(idle_minutes: float | None) -> str:
    """How long a kept server stays up, in the words the commands print."""
    if idle_minutes is None:
        return "until `conveyor server stop`"
    return f"for {idle_minutes:g} min after the last run"


def _state_path(home: Path) -> Path:
    return home / STATE_FILE


def read_state(home: Path) -> dict | None:
    try:
        state = json.loads(_state_path(home).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _identity(pid: int) -> tuple[float, list[str]] | None:
    """(create time, command line) of a live process, None when it is gone."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.create_time(), proc.cmdline()
    except psutil.Error:
        return None


def _record(proc: subprocess.Popen) -> dict:
    """What identifies ``proc`` later: its pid, create time and command line once it has exec'd (a
    freshly forked child still shows its parent's command line for a moment)."""
    args = [str(a) for a in proc.args] if isinstance(proc.args, list | tuple) else []
    deadline = time.monotonic() + 5.0
    found = _identity(proc.pid)
    while found is not None and found[1] != args and time.monotonic() < deadline:
        time.sleep(0.01)
        found = _identity(proc.pid)
    created, cmdline = found or (0.0, [])
    return {"pid": proc.pid, "created": created, "cmdline": cmdline}


def _same_process(pid: int, recorded: dict) -> bool:
    """Whether ``pid`` is still the process recorded (a reused pid is never signalled)."""
    found = _identity(pid)
    return found is not None and abs(found[0] - recorded["created"]) < 1.0 and found[1] == recorded["cmdline"]


def _write_state(home: Path, state: dict) -> None:
    path = _state_path(home)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(state, indent=2))
    os.replace(partial, path)


def touch(home: Path, url: str) -> None:
    """A run used the kept server at ``url``: its idle time starts again."""
    state = read_state(home)
    if state and state.get("url") == url:
        try:
            os.utime(_state_path(home))
        except OSError:
            pass


def keep(api: PrefectApi, home: Path, minutes: float | None) -> None:
    """Leave the server ``api`` started running, recorded in ``home``; a watchdog process stops it after
    ``minutes`` without a flow run (never when None)."""
    proc = api.started
    if proc is None or proc.poll() is not None:
        return
    if not _DETACHED:
        import atexit

        atexit.register(_reap_detached)
    state = {"url": api.url, "server": _record(proc), "idle_minutes": minutes, "watchdog": None}
    _write_state(home, state)
    if minutes is not None:
        watcher = subprocess.Popen(
            [sys.executable, "-m", "conveyor.prefect_api", "watch", str(home)],
            env=os.environ.copy() | QUIET_ENV,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        _DETACHED.append(watcher)  # outlives this process; never waited for here
        state["watchdog"] = _record(watcher)
        _write_state(home, state)
    _DETACHED.append(proc)
    api.started = None  # no longer this process's to stop


def _reap_detached() -> None:
    """At exit: collect the exit status of a kept process that was stopped meanwhile (tests stop them), so
    no "still running" warning names a process that is gone; one still running is kept on purpose."""
    for proc in _DETACHED:
        proc.poll()


def _active_runs(api_url: str) -> bool:
    """Whether the API has a flow run that is not finished (scheduled, pending, running, paused...)."""
    body = json.dumps(
        {
            "flow_runs": {
                "state": {"type": {"any_": ["SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING"]}}
            },
            "limit": 1,
        }
    ).encode()
    request = urllib.request.Request(
        f"{api_url.rstrip('/')}/flow_runs/filter",
        data=body,
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return bool(json.loads(resp.read()))
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _signal_group(recorded: dict, sig: int) -> bool:
    if not _same_process(recorded["pid"], recorded):
        return False
    try:
        os.killpg(os.getpgid(recorded["pid"]), sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _end(recorded: dict, timeout_s: float = 20.0) -> bool:
    """SIGTERM the recorded process group, SIGKILL it after ``timeout_s``; True when one was signalled."""
    if not _signal_group(recorded, signal.SIGTERM):
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _identity(recorded["pid"]) is not None:
        time.sleep(0.1)
    if _identity(recorded["pid"]) is not None:
        _signal_group(recorded, signal.SIGKILL)
    return True


def stop_kept(home: Path) -> str | None:
    """Stop the server recorded in ``home`` and its watchdog; the stopped server's URL, None if none ran."""
    state = read_state(home)
    if state is None:
        return None
    try:  # unrecorded first: a command starting now does not adopt a server about to stop
        _state_path(home).unlink()
    except FileNotFoundError:
        pass
    watchdog = state.get("watchdog")
    if watchdog and watchdog["pid"] != os.getpid():
        _end(watchdog, timeout_s=5.0)
    return state["url"] if _end(state["server"]) else None


def kept_server(home: Path) -> dict | None:
    """The state of the server kept in ``home`` when it is still running, else None."""
    state = read_state(home)
    if state is None or not _same_process(state["server"]["pid"], state["server"]):
        return None
    return state


def watch(home: Path, poll_s: float = WATCH_POLL_S) -> None:
    """Stop the kept server once no flow run has started, run or been touched for its idle minutes."""
    while True:
        state = kept_server(home)
        if state is None or state.get("idle_minutes") is None:
            return
        idle_s = float(state["idle_minutes"]) * 60
        path = _state_path(home)
        try:
            last = path.stat().st_mtime
        except OSError:
            return
        if time.time() - last >= idle_s:
            if _active_runs(state["url"]):
                touch(home, state["url"])
            else:
                stop_kept(home)
                return
        time.sleep(min(poll_s, max(0.2, idle_s / 4)))


def export(api: PrefectApi) -> None:
    """Point this process and every child (Dask workers included) at ``api``."""
    os.environ.update(QUIET_ENV)
    os.environ["PREFECT_API_URL"] = api.url


def tune_flow_engine() -> None:
    """Do not wait for the flow-run heartbeat thread at the end of a run (0-1 s of every run).

    Prefect 3.8's sync flow engine joins its heartbeat thread when the flow ends, and that thread
    sleeps in whole seconds between checks of its stop flag; the async engine passes
    ``join_on_exit=False``, which this applies to the sync engine too. The thread is a daemon that
    sends no heartbeat once stopped, so nothing is lost. Left as is (a debug log) where the private
    hook differs, e.g. a Prefect other than the pinned one.
    """
    import functools
    import inspect

    from prefect import flow_engine

    hook = getattr(flow_engine, "_send_heartbeats", None)
    if hook is None or getattr(hook, "conveyor_no_join", False):
        return
    if "join_on_exit" not in inspect.signature(hook).parameters:
        logging.getLogger(__name__).debug("prefect.flow_engine._send_heartbeats changed: not tuned")
        return
    tuned = functools.partial(hook, join_on_exit=False)
    tuned.conveyor_no_join = True  # type: ignore[attr-defined]
    flow_engine._send_heartbeats = tuned


def drain_prefect(timeout: float = 10.0) -> None:
    """Send queued logs and events now, while the API still answers (else they retry after it stops)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=timeout)
        except RuntimeError:  # never started in this process
            pass


if __name__ == "__main__":  # python -m conveyor.prefect_api template  (run by `make` once per install)
    if sys.argv[1:2] == ["watch"] and len(sys.argv) == 3:  # started by keep(): the idle stop
        watch(Path(sys.argv[2]))
        raise SystemExit(0)
    if sys.argv[1:] != ["template"]:
        raise SystemExit("usage: python -m conveyor.prefect_api template | watch PREFECT_HOME")
    print(f"prefect database template: {build_template()}")
