"""Operating commands as a user types them: ``conveyor gc --apply``, ``backup``/``restore`` (local and
S3), ``rollback --to``, ``models --json`` and ``serve`` with the token from the environment, each in a
subprocess (``python -m conveyor.cli``) against a store of its own."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conveyor.prefect_api import free_port
from conveyor.store.maintenance import copy_root
from conveyor.store.registry import CHAMPION, alias_history, read_alias, set_alias
from conveyor.store.storage import Store, open_manifest
from tests.support import (
    MODEL,
    REPO_ROOT,
    allow_roots,
    fake_versions,
    file_stamps,
    fresh_store,
    stop_group,
    wait_for,
)

TOKEN = "cli-test-token-not-a-secret"
LABEL = "is_late"  # the flights spec's label (pipelines/flights.yaml)
HOUR_AGO = time.time() - 7200  # older than gc's default --min-age (3600 s)


def _env(**extra: str) -> dict[str, str]:
    """This process's environment without Prefect settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CONVEYOR_"))}
    return env | extra


def _conveyor(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "conveyor.cli", *args],
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
    )


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stdout


def _user_store(root: Path, pipeline_run) -> Store:
    """A copy of the session's committed datasets, models and aliases: the user's own storage root."""
    store = Store.from_url(root.as_uri())
    report = copy_root(pipeline_run.store, store)
    assert report.ok, report.failed
    return store


# --- gc ------------------------------------------------------------------------------------------


def test_gc_lists_then_removes_only_what_no_reader_trusts(tmp_path, pipeline_run) -> None:
    store = _user_store(tmp_path / "store", pipeline_run)
    silver = pipeline_run.cleaned.silver
    committed_dir = Path(store.path(store.dataset_url("silver_flights", silver.version)))
    part = (
        committed_dir
        / open_manifest(store, store.dataset_url("silver_flights", silver.version)).files[0].path
    )
    # An interrupted run's version (parts, no manifest), a stray part beside a manifest, and a fresh
    # uncommitted version a run may still be writing.
    crashed = Path(store.path(store.dataset_url("silver_flights", "deadbeefdeadbeef")))
    crashed.mkdir(parents=True)
    shutil.copy(part, crashed / "part-00000.parquet")
    stray = committed_dir / "part-99999.parquet"
    shutil.copy(part, stray)
    for path in (crashed / "part-00000.parquet", stray):
        os.utime(path, (HOUR_AGO, HOUR_AGO))
    writing = Path(store.path(store.dataset_url("silver_flights", "0123456789abcdef")))
    writing.mkdir(parents=True)
    shutil.copy(part, writing / "part-00000.parquet")
    root = tmp_path / "store"
    orphans = {str(p.relative_to(root)) for p in (stray, crashed / "part-00000.parquet")}
    kept = {k: v for k, v in file_stamps(root).items() if k not in orphans}

    listed = json.loads(_ok(_conveyor("gc", "--storage-url", store.root, "--json")))
    assert not listed["removed"] and listed["skipped_young"] == 1
    assert sorted(o["path"].split(str(root))[-1].lstrip("/") for o in listed["orphans"]) == sorted(orphans)
    assert stray.exists() and (crashed / "part-00000.parquet").exists()  # a dry run removes nothing

    out = _ok(_conveyor("gc", "--storage-url", store.root, "--apply"))
    assert out.startswith("removed 2 orphaned files") and "left 1 uncommitted files younger than" in out
    assert not stray.exists() and not (crashed / "part-00000.parquet").exists()
    assert file_stamps(root) == kept  # everything else untouched
    assert (writing / "part-00000.parquet").exists()  # too young to judge
    assert "all match their manifests" in _ok(_conveyor("verify", "--storage-url", store.root))


# --- backup and restore ----------------------------------------------------------------------------


def _backup_restore(source: Store, backup_url: str, restored: Path, env: dict[str, str]) -> dict:
    first = json.loads(
        _ok(_conveyor("backup", "--storage-url", source.root, "--to", backup_url, "--json", env=env))
    )
    assert first["copied"] and first["failed"] == {} and first["aliases"] >= 1
    again = json.loads(
        _ok(_conveyor("backup", "--storage-url", source.root, "--to", backup_url, "--json", env=env))
    )
    assert again["copied"] == [] and sorted(again["skipped"]) == sorted(first["copied"])  # resumable
    out = _ok(
        _conveyor("restore", "--storage-url", restored.as_uri(), "--from", backup_url, "--json", env=env)
    )
    back = json.loads(out)
    assert sorted(back["copied"]) == sorted(first["copied"]) and back["failed"] == {}
    assert "all match their manifests" in _ok(
        _conveyor("verify", "--storage-url", restored.as_uri(), env=env)
    )
    return first


def test_backup_and_restore_a_local_root(tmp_path, pipeline_run) -> None:
    source = _user_store(tmp_path / "store", pipeline_run)
    first = _backup_restore(source, (tmp_path / "backup").as_uri(), tmp_path / "restored", _env())
    restored = Store.from_url((tmp_path / "restored").as_uri())
    assert read_alias(restored, MODEL).version == read_alias(source, MODEL).version
    assert f"models/{MODEL}/{pipeline_run.trained.version}" in first["copied"]


def test_backup_to_s3_and_restore_from_it(tmp_path, pipeline_run, s3_options) -> None:
    """Credentials per URL prefix from CONVEYOR_STORAGE_OPTIONS (the local roots get none), never printed."""
    source = _user_store(tmp_path / "store", pipeline_run)
    env = _env(CONVEYOR_STORAGE_OPTIONS=json.dumps({"s3://conveyor-test/": s3_options}))
    first = _backup_restore(source, "s3://conveyor-test/backup", tmp_path / "restored", env)
    assert f"models/{MODEL}/{pipeline_run.trained.version}" in first["copied"]
    check = _conveyor("verify", "--storage-url", "s3://conveyor-test/backup", env=env)
    assert (
        "all match their manifests" in _ok(check) and s3_options["secret"] not in check.stdout + check.stderr
    )
    restored = Store.from_url((tmp_path / "restored").as_uri())
    assert read_alias(restored, MODEL).version == read_alias(source, MODEL).version


# --- the registry: rollback --to, models --json ----------------------------------------------------


def test_rollback_to_a_version_and_models_json(tmp_path) -> None:
    store = Store.from_url((tmp_path / "store").as_uri())
    fake_versions(store, "v0", "v1", "v2", "v3")
    for version, previous in (("v1", None), ("v2", "v1"), ("v3", "v2")):
        set_alias(store, MODEL, CHAMPION, version, "promote", expected=previous, action="promote")

    out = _ok(_conveyor("rollback", "--storage-url", store.root, "--to", "v1", "--reason", "bad v3"))
    assert out.strip() == f"{MODEL}/champion: rolled back v3 -> v1 (event #4)"
    last = alias_history(store, MODEL)[-1]
    assert (last.action, last.previous, last.version, last.reason) == ("rollback", "v3", "v1", "bad v3")

    refused = _conveyor("rollback", "--storage-url", store.root, "--to", "nope")
    assert refused.returncode == 1 and "not registered" in refused.stderr
    assert read_alias(store, MODEL).version == "v1"  # a refused rollback moves nothing

    listing = json.loads(_ok(_conveyor("models", "--storage-url", store.root, "--json", "--history")))
    assert {v["version"] for v in listing["versions"]} == {"v0", "v1", "v2", "v3"}
    assert listing["aliases"]["champion"]["version"] == "v1"
    assert [(e["action"], e["version"]) for e in listing["history"]] == [
        ("promote", "v1"),
        ("promote", "v2"),
        ("promote", "v3"),
        ("rollback", "v1"),
    ]
    assert [v["aliases"] for v in listing["versions"] if v["version"] == "v1"] == [["champion"]]


def test_rollback_to_an_unregistered_version_is_one_clear_line(tmp_path) -> None:
    store = Store.from_url((tmp_path / "store").as_uri())
    fake_versions(store, "v0", "v1")
    set_alias(store, MODEL, CHAMPION, "v1", "promote", expected=None, action="promote")
    refused = _conveyor("rollback", "--storage-url", store.root, "--to", "nope")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "not registered" in refused.stderr


# --- serve, with the token from the environment ------------------------------------------------------


@pytest.fixture
def served(tmp_path, pipeline_run):
    """``conveyor serve`` in its own process group with CONVEYOR_SERVING_TOKEN set; stopped in teardown."""
    store = fresh_store(tmp_path / "store", pipeline_run, pipeline_run.trained.version)
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 (the server's output; closed in teardown)
    proc = subprocess.Popen(
        [sys.executable, "-m", "conveyor.cli", "serve", "--storage-url", store.root, "--port", str(port)],
        env=_env(CONVEYOR_SERVING_TOKEN=TOKEN),
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO_ROOT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"

    def healthy():
        if proc.poll() is not None:
            raise AssertionError((tmp_path / "serve.log").read_text()[-3000:])
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(healthy, "conveyor serve to answer /health", timeout=120)
        yield url, store
    finally:
        stop_group(proc)
        log.close()
    output = (tmp_path / "serve.log").read_text()
    # A clean stop: uvicorn finishes its shutdown, then exits by the signal it was sent.
    assert proc.returncode in (0, -signal.SIGTERM) and "Application shutdown complete" in output, output[
        -3000:
    ]
    assert "Traceback" not in output, output[-3000:]


def test_serve_takes_its_token_from_the_environment(served, pipeline_run) -> None:
    import pandas as pd

    url, _ = served
    frame = pd.read_parquet(
        Store.from_url(pipeline_run.store.root).path(pipeline_run.cleaned.silver.url),
        columns=pipeline_run.trained.features,
    ).head(5)
    rows = json.loads(frame.to_json(orient="records", date_format="iso"))
    assert httpx.post(f"{url}/predict/features", json={"rows": rows}, timeout=60).status_code == 401
    wrong = {"Authorization": "Bearer not-the-token"}
    assert (
        httpx.post(f"{url}/predict/features", json={"rows": rows}, headers=wrong, timeout=60).status_code
        == 401
    )
    auth = {"Authorization": f"Bearer {TOKEN}"}
    resp = httpx.post(f"{url}/predict/features", json={"rows": rows}, headers=auth, timeout=60)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["version"] == pipeline_run.trained.version and len(body["probabilities"]) == 5
    assert (
        httpx.get(f"{url}/model", headers=auth, timeout=60).json()["version"] == pipeline_run.trained.version
    )


# --- score and monitor: flows on their own cluster, recorded by the session's Prefect API -----------


def _prefect_env(monkeypatch, root: Path, **extra: str) -> dict[str, str]:
    """The environment of a command run against the session's Prefect API (what PREFECT_API_URL does),
    set up by an operator who allows ``root``."""
    from prefect.settings import PREFECT_API_URL

    allowed = allow_roots(monkeypatch, root)
    api = {"PREFECT_API_URL": str(PREFECT_API_URL.value()), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    return _env(**api, **allowed, **extra)


def _flow_runs(flow_name: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])))


def test_score_a_committed_dataset(prefect_api, tmp_path, pipeline_run, monkeypatch) -> None:
    store = fresh_store(tmp_path / "store", pipeline_run, pipeline_run.trained.version)
    silver = pipeline_run.cleaned.silver
    shutil.copytree(
        pipeline_run.store.path(silver.url), store.path(store.dataset_url(silver.name, silver.version))
    )
    input_url = store.dataset_url(silver.name, silver.version)
    before = {r.id for r in _flow_runs("conveyor-batch-scoring")}

    out = _ok(
        _conveyor(
            "score",
            "--storage-url",
            store.root,
            "--input-url",
            input_url,
            "--cluster",
            "cpu",
            "--n-workers",
            "1",
            env=_prefect_env(monkeypatch, tmp_path),
        )
    )
    assert out.startswith(f"scored {silver.rows:,} rows with {MODEL} {pipeline_run.trained.version}"), out
    [predictions] = [line.split()[-1] for line in out.splitlines() if line.strip().startswith("predictions ")]
    assert (
        predictions.startswith(store.url("datasets"))
        and open_manifest(store, predictions).rows == silver.rows
    )
    [run] = [r for r in _flow_runs("conveyor-batch-scoring") if r.id not in before]
    assert run.state.is_completed()  # recorded by the API the environment named


def test_monitor_rolls_back_a_champion_that_misbehaves(
    prefect_api, tmp_path, pipeline_run, receiver, monkeypatch
) -> None:
    import pandas as pd

    from conveyor.store.storage import commit_dataset

    champion = pipeline_run.trained.version
    store = fresh_store(tmp_path / "store", pipeline_run, champion)
    fake_versions(store, "older")
    set_alias(store, MODEL, CHAMPION, "older", "an earlier champion", expected=champion, action="promote")
    set_alias(store, MODEL, CHAMPION, champion, "back to the real one", expected="older", action="promote")
    # Recent labelled flights where the world now disagrees with the model: every label flipped.
    frame = pd.read_parquet(pipeline_run.store.path(pipeline_run.cleaned.silver.url))
    frame = frame[frame["sched_dep"] >= pd.Timestamp("2013-10-01", tz="UTC")].copy()
    frame[LABEL] = (1 - frame[LABEL]).astype("int8")
    recent = store.dataset_url("recent_flights", "v1")
    Path(store.path(recent)).mkdir(parents=True)
    frame.to_parquet(Path(store.path(recent)) / "part-00000.parquet", index=False)
    commit_dataset(store, "recent_flights", "v1", recent, lineage={"test": "flipped labels"}, parallel=False)
    url, received = receiver

    proc = _conveyor(
        "monitor",
        "--storage-url",
        store.root,
        "--data-url",
        recent,
        "--cluster",
        "cpu",
        "--n-workers",
        "1",
        env=_prefect_env(monkeypatch, tmp_path, CONVEYOR_ALERT_WEBHOOKS=url),
    )
    out = _ok(proc)
    assert out.startswith("monitor: ") and "rolled back to older" in out, out
    last = alias_history(store, MODEL)[-1]
    assert (last.action, last.previous, last.version, last.by) == (
        "rollback",
        champion,
        "older",
        "model-monitor",
    )
    [alert] = wait_for(lambda: [a for a in received if a["kind"] == "model.rollback"], "the rollback alert")
    assert alert["details"]["version"] == champion and alert["details"]["rolled_back_to"] == "older"
