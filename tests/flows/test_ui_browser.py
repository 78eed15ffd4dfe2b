"""The served setup in a real browser: a person fills the run form, presses Submit and sees the report.

A real ``prefect server`` on a free port, the process work pool, the ``on-demand``
deployment registered from prefect.yaml, a ``prefect worker``, and Debian's
chromium driven by Playwright (its own browser download cannot work here).
The UI is Prefect 3.8's default (v1) app. Deselect with ``-m "not browser"``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from conveyor.prefect_api import QUIET_ENV, free_port, healthy
from conveyor.serve_local import POOL
from tests.support import REPO_ROOT

CHROMIUM = Path(os.environ.get("CONVEYOR_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
DEPLOYMENT = "on-demand"
REPORT_KEY = "flights-late-report"
SAMPLE_ROWS = 20_000
RUN_TIMEOUT_S = 480  # the flow run, from Submit to a final state, on a shared 2-core machine
FINAL_STATES = re.compile(r"^(Completed|Failed|Crashed|Cancelled|TimedOut)$")


def _skip_reason() -> str | None:
    if not CHROMIUM.exists():
        return (
            f"no browser at {CHROMIUM}: install Debian's chromium (`apt-get install -y chromium`, which "
            ".ci/run tries) or point CONVEYOR_CHROMIUM at one"
        )
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is not installed (dev dependency group)"
    return None


SKIP = _skip_reason()
pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.skipif(SKIP is not None, reason=SKIP or "")]


@dataclass(frozen=True)
class Served:
    ui: str  # http://127.0.0.1:<port>
    api: str  # .../api
    store: Path  # the storage root of every run (CONVEYOR_STORAGE_URL of the deploy and the worker)
    home: Path  # PREFECT_HOME: server.log, worker.log


def _spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stopped with killpg
        )


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (a zombie waiting for its parent does not count)."""
    import psutil

    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def _stop_group(pgid: int, timeout: float = 20) -> None:
    """SIGTERM the process group ``pgid``, SIGKILL what is left after ``timeout``."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while _group_alive(pgid):
        if time.monotonic() > deadline:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return
        time.sleep(0.2)


def _stop(proc: subprocess.Popen) -> None:
    """Stop ``proc``'s group and the groups its children started (a flow run is a session of its own)."""
    import psutil

    groups = []
    try:
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                pgid = os.getpgid(child.pid)
            except ProcessLookupError:
                continue
            if pgid not in groups and pgid != proc.pid:
                groups.append(pgid)
    except psutil.NoSuchProcess:
        pass
    for pgid in [*groups, proc.pid]:
        _stop_group(pgid)
    proc.wait(timeout=10)


def _api(method: str, url: str, body: object | None = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def _prefect(args: list[str], env: dict[str, str], timeout: float = 300) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise AssertionError(f"prefect {' '.join(args)} failed:\n{(done.stdout + done.stderr)[-3000:]}")


@contextmanager
def serve(home: Path, store: Path) -> Iterator[Served]:
    """Server, pool, the on-demand deployment and a worker, as ``make serve-local`` sets them up."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | QUIET_ENV
    base |= {
        "PREFECT_HOME": str(home),
        "CONVEYOR_REPO": str(REPO_ROOT),
        "CONVEYOR_STORAGE_URL": store.as_uri(),
    }
    # Without PREFECT_UI_API_URL the UI calls 127.0.0.1:4200 whatever port the server listens on.
    server_env = base | {"PREFECT_UI_API_URL": api, "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false"}
    client_env = base | {"PREFECT_API_URL": api, "PREFECT_WORKER_QUERY_SECONDS": "2"}
    procs: list[subprocess.Popen] = []
    try:
        server = _spawn(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            server_env,
            home / "server.log",
        )
        procs.append(server)
        deadline = time.monotonic() + 240
        while not healthy(api):
            assert server.poll() is None, (home / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "prefect server did not start in 240 s"
            time.sleep(0.5)
        _prefect(["work-pool", "create", POOL, "--type", "process"], client_env)
        # Only what the test needs: all of prefect.yaml would add schedules (nightly, hourly) to the queues.
        _prefect(["deploy", "--name", DEPLOYMENT], client_env)
        procs.append(
            _spawn(
                [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--type", "process"],
                client_env,
                home / "worker.log",
            )
        )
        yield Served(ui=f"http://127.0.0.1:{port}", api=api, store=store, home=home)
    finally:
        for proc in reversed(procs):
            _stop(proc)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serve(tmp_path_factory.mktemp("prefect-home"), tmp_path_factory.mktemp("store")) as stack:
        yield stack


def _field(page, title: str):
    """One property of the generated run form, found from its title: the v1 form's ``<label for>`` does not
    match the input's id, so ``get_by_label`` finds nothing."""
    return page.locator(
        "xpath=//span[contains(@class,'schema-form-property__label')]"
        f"[starts-with(normalize-space(.), '{title}')]"
        "/ancestor::div[contains(concat(' ',normalize-space(@class),' '),' schema-form-property ')][1]"
    )


def _choose(page, field, option: str) -> None:
    """Pick ``option`` in an enum dropdown: a mouse click opens and at once closes it in headless chromium."""
    from playwright.sync_api import expect

    control = field.locator("button.p-select-button__control").first
    control.focus()
    page.keyboard.press("Space")
    page.get_by_role("option", name=option, exact=True).click()
    expect(control).to_have_text(option)


def _screenshot(page, path: Path) -> None:
    """The whole page: the UI scrolls an inner panel, so grow the viewport to it for the picture."""
    size = page.viewport_size
    height = page.evaluate("() => Math.max(...[...document.querySelectorAll('*')].map(e => e.scrollHeight))")
    page.set_viewport_size({"width": size["width"], "height": min(max(height, size["height"]), 12_000)})
    page.screenshot(path=path)
    page.set_viewport_size(size)


IMAGES_JS = "imgs => imgs.map(i => ({alt: i.alt, src: i.src.slice(0, 40), width: i.naturalWidth}))"


@pytest.mark.timeout(900)
def test_a_custom_run_from_the_ui_completes_and_its_report_shows_the_roc_plot(
    served: Served, tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    shots = tmp_path / "screenshots"
    shots.mkdir()
    where = f"screenshots in {shots}, logs in {served.home}"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        try:
            page.goto(f"{served.ui}/deployments")
            link = page.get_by_role("link", name=DEPLOYMENT, exact=True)
            expect(link).to_be_visible()
            link.click()
            page.wait_for_url(re.compile(r"/deployments/deployment/[0-9a-f-]{36}$"))
            # exact: the "Runs" item of the side bar is a button too
            page.get_by_role("button", name="Run", exact=True).click()
            page.get_by_role("button", name="Custom run").click()
            page.wait_for_url(re.compile(r"/deployments/deployment/[0-9a-f-]{36}/run"))
            submit = page.get_by_role("button", name="Submit")
            expect(submit).to_be_visible()
            expect(page.get_by_text('Property is type "None"')).to_have_count(0)
            _screenshot(page, shots / "1_run_form.png")

            _field(page, "Data · Sample rows").locator("input").fill(str(SAMPLE_ROWS))
            _choose(page, _field(page, "Resources · Dask cluster"), "cpu")
            _screenshot(page, shots / "2_filled.png")
            run_name = page.locator("input.p-text-input__control").first.input_value()
            submit.click()
            # The toast is rendered twice (two toast apps are mounted); the later one is on top: .last.
            toast = page.locator(".toast-flow-run-create").filter(has_text=f"{run_name} scheduled").last
            expect(toast).to_be_visible(timeout=15_000)
            toast.get_by_role("button", name="View run").click()
            page.wait_for_url(re.compile(r"/runs/flow-run/[0-9a-f-]{36}"))
            run_id = re.search(r"/runs/flow-run/([0-9a-f-]{36})", page.url).group(1)

            badge = page.locator(".state-badge").first
            expect(badge).to_have_text(FINAL_STATES, timeout=RUN_TIMEOUT_S * 1000)
            _screenshot(page, shots / "3_run_final.png")
            run = _api("GET", f"{served.api}/flow_runs/{run_id}")
            assert badge.inner_text().strip() == "Completed", (
                f"the flow run ended {run['state']['type']}: {run['state']['message']} ({where})"
            )
            params = run["parameters"]["params"]
            assert params["max_rows"] == SAMPLE_ROWS and params["cluster"] == "cpu", params
            assert (served.store / "models").is_dir(), f"the run stored nothing under {served.store}"

            page.get_by_role("tablist").get_by_text("Artifacts", exact=True).click()
            panel = page.get_by_role("tabpanel", name="Artifacts")
            card = panel.get_by_role("link", name=re.compile(REPORT_KEY))
            expect(card).to_be_visible()
            card.click()  # /artifacts/artifact/<id> renders the markdown (/artifacts/key/<key> is a timeline)
            page.wait_for_url(re.compile(r"/artifacts/artifact/[0-9a-f-]{36}"))
            roc = page.locator("img[alt*='roc' i]").first
            try:
                expect(roc).to_be_attached(timeout=30_000)
            finally:
                _screenshot(page, shots / "4_report.png")
            images = page.locator("img").evaluate_all(IMAGES_JS)
            width = roc.evaluate("img => img.decode().then(() => img.naturalWidth, () => 0)")
            assert width > 0, f"the ROC image did not load: images on the page {images} ({where})"
        finally:
            browser.close()
