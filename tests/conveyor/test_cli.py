"""The README command in a subprocess: exits 0, prints the summary, keeps its Prefect server until stopped."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conveyor.prefect_api import _port_free, free_port
from tests.support import REPO_ROOT

NOISE = re.compile(r"Traceback|Warning|CancelledError|Error logging|Exception|got rank", re.IGNORECASE)


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    return env


def _conveyor(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "conveyor.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
    )


@pytest.mark.e2e
def test_conveyor_run_end_to_end_is_clean(tmp_path: Path) -> None:
    port = free_port()
    summary_path = tmp_path / "summary.json"
    env = _env(tmp_path) | {"CONVEYOR_KEEP_SERVER_MINUTES": "30"}  # the default a user gets
    try:
        _run_end_to_end(tmp_path, port, summary_path, env)
    finally:
        _conveyor("server", "stop", env=env, timeout=120)


def _run_end_to_end(tmp_path: Path, port: int, summary_path: Path, env: dict[str, str]) -> None:
    proc = _conveyor(
        "run",
        "--storage-url",
        str(tmp_path / "store"),
        "--max-rows",
        "30000",
        "--cluster",
        "cpu",
        "--n-workers",
        "2",
        "--prefect-port",
        str(port),
        "--summary-json",
        str(summary_path),
        "--search-budget",
        "3",
        env=env,
        timeout=540,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert not NOISE.search(output), output[-4000:]
    assert "Conveyor run summary" in proc.stdout and "holdout ROC AUC" in proc.stdout
    summary = json.loads(summary_path.read_text())
    assert summary["metrics"]["roc_auc"] > summary["baseline_metrics"]["roc_auc"]
    assert summary["promoted"]
    assert (
        summary["search"]["candidates"] == 3 and "search" in proc.stdout
    )  # the search path, end to end, quietly
    assert (tmp_path / "store" / "models" / summary["model"] / "aliases" / "champion.json").exists()
    # The server the command started stays up for the UI and the next run, until `conveyor server stop`.
    assert not _port_free(port), "the Prefect server was not kept"
    assert f"Prefect UI: http://127.0.0.1:{port}" in proc.stdout and "conveyor server stop" in proc.stdout
    status = _conveyor("server", "status", env=env, timeout=60)
    assert f"http://127.0.0.1:{port}" in status.stdout, status.stdout + status.stderr
    stop = _conveyor("server", "stop", env=env, timeout=120)
    assert stop.returncode == 0 and "stopped the Prefect server" in stop.stdout, stop.stdout + stop.stderr
    assert _port_free(port), "`conveyor server stop` left the Prefect server listening"


def test_bad_parameter_gets_one_clear_line(tmp_path: Path) -> None:
    proc = _conveyor("run", "--cluster", "kubernetes", env=_env(tmp_path), timeout=120)
    assert proc.returncode == 2
    assert "cluster" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_bad_search_family_gets_one_clear_line(tmp_path: Path) -> None:
    proc = _conveyor("run", "--search-families", "gbtree,svm", env=_env(tmp_path), timeout=120)
    assert proc.returncode == 2 and "search.families" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_family_and_search_flags_build_the_params() -> None:
    from conveyor.cli import build_parser
    from conveyor.cli.runs import build_params

    args = build_parser().parse_args(
        ["run", "--family", "linear", "--search-budget", "4", "--search-families", "linear, random_forest"]
    )
    params = build_params(args)
    assert params.training.model == "linear"
    assert params.search.budget == 4 and params.search.families == ["linear", "random_forest"]
    assert build_params(build_parser().parse_args(["run"])).search is None


def test_flow_module_help_works() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "conveyor.flows.training", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 0 and "--storage-url" in proc.stdout
