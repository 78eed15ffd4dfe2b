"""The model registry: compare-and-swap aliases, append-only history, rollback, and the deploy gate.

Helpers (``fresh_store``, ``variant``) live in tests/support.py: each test copies
registered versions into its own store, so no test moves an alias of the
session's shared ``pipeline_run`` store.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conveyor.store.registry import (
    CHAMPION,
    AliasConflict,
    RegistryError,
    alias_history,
    alias_url,
    event_url,
    get_alias,
    list_versions,
    read_alias,
    rollback,
    rollback_target,
    set_alias,
)
from conveyor.store.storage import Store, read_json, write_json_atomic
from conveyor.tasks import deploy as deploy_stage
from conveyor.tasks.deploy import GateParams
from tests.support import MODEL, REPO_ROOT, fake_versions, fresh_store, variant

# --- aliases: compare-and-swap and history ---------------------------------------------------


@pytest.fixture
def store(tmp_path) -> Store:
    s = Store.from_url((tmp_path / "store").as_uri())
    fake_versions(s, *(f"v{i}" for i in range(8)))
    return s


def test_set_alias_is_a_compare_and_swap_with_history(store) -> None:
    first = set_alias(store, MODEL, CHAMPION, "v0", "first", expected=None)
    assert (first.seq, first.previous) == (1, None)
    with pytest.raises(AliasConflict, match="not the expected"):
        set_alias(store, MODEL, CHAMPION, "v1", "stale caller", expected="v5")
    second = set_alias(store, MODEL, CHAMPION, "v1", "second", expected="v0", by="tester@ci")
    assert (second.seq, second.previous, second.by) == (2, "v0", "tester@ci")
    history = alias_history(store, MODEL)
    assert [(e.seq, e.version, e.reason) for e in history] == [(1, "v0", "first"), (2, "v1", "second")]
    assert get_alias(store, MODEL)["version"] == "v1"
    with pytest.raises(ValueError, match="not registered"):
        set_alias(store, MODEL, CHAMPION, "nope", "bogus")
    with pytest.raises(RegistryError, match="alias"):
        set_alias(store, MODEL, "Bad Name", "v1", "bogus")


def test_racing_threads_exactly_one_promotion_wins(store) -> None:
    set_alias(store, MODEL, CHAMPION, "v0", "start", expected=None)
    barrier = threading.Barrier(7)
    won, lost = [], []

    def promote(version: str) -> None:
        barrier.wait()
        try:
            set_alias(store, MODEL, CHAMPION, version, f"race {version}", expected="v0", action="promote")
            won.append(version)
        except AliasConflict:
            lost.append(version)

    threads = [threading.Thread(target=promote, args=(f"v{i}",)) for i in range(1, 8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(won) == 1 and len(lost) == 6
    assert read_alias(store, MODEL).version == won[0]
    assert [e.version for e in alias_history(store, MODEL)] == ["v0", won[0]]
    assert read_json(store, alias_url(store, MODEL, CHAMPION))["version"] == won[0]


RACER = """
import os, sys, time
from conveyor.store.registry import AliasConflict, set_alias
from conveyor.store.storage import Store
root, version, go = sys.argv[1:4]
open(go + "." + version, "w").close()  # ready
while not os.path.exists(go):  # the start line: every racer is imported and waiting
    time.sleep(0.001)
try:
    set_alias(Store.from_url(root), "flights_late", "champion", version, "race", expected="v0",
              action="promote")
    print("won")
except AliasConflict:
    print("lost")
"""


def test_racing_processes_exactly_one_promotion_wins(store, tmp_path) -> None:
    set_alias(store, MODEL, CHAMPION, "v0", "start", expected=None)
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, store.root, f"v{i}", str(go)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
        )
        for i in range(1, 5)
    ]
    try:
        deadline = time.monotonic() + 120
        while not all(Path(f"{go}.v{i}").exists() for i in range(1, 5)) and time.monotonic() < deadline:
            time.sleep(0.05)  # every racer imported and waiting at the start line
        go.touch()
        outcomes = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert outcomes == ["lost", "lost", "lost", "won"]
    history = alias_history(store, MODEL)
    assert [e.seq for e in history] == [1, 2] and history[1].previous == "v0"
    assert read_alias(store, MODEL).version == history[1].version


def test_pointer_is_never_torn_while_it_moves(store) -> None:
    set_alias(store, MODEL, CHAMPION, "v0", "start", expected=None)
    stop = threading.Event()
    seen, errors = set(), []

    def reader() -> None:
        path = store.path(alias_url(store, MODEL, CHAMPION))
        while not stop.is_set():
            try:
                with open(path, "rb") as fh:
                    seen.add(json.load(fh)["version"])
            except Exception as exc:  # a torn or missing pointer would land here
                errors.append(repr(exc))

    readers = [threading.Thread(target=reader) for _ in range(2)]
    [t.start() for t in readers]
    try:
        for i in range(60):
            set_alias(store, MODEL, CHAMPION, f"v{(i + 1) % 8}", "churn")
    finally:
        stop.set()
        [t.join() for t in readers]
    assert errors == []
    assert seen <= {f"v{i}" for i in range(8)}
    assert [e.seq for e in alias_history(store, MODEL)] == list(range(1, 62))


def test_readers_follow_an_event_the_pointer_missed(store) -> None:
    """A writer that died after its history event but before the pointer write still moved the alias."""
    set_alias(store, MODEL, CHAMPION, "v0", "start", expected=None)
    moved = dataclasses.asdict(read_alias(store, MODEL)) | {"seq": 2, "version": "v3", "previous": "v0"}
    write_json_atomic(store, event_url(store, MODEL, CHAMPION, 2), moved)
    assert read_alias(store, MODEL).version == "v3"
    with pytest.raises(AliasConflict):
        set_alias(store, MODEL, CHAMPION, "v4", "stale", expected="v0")
    assert set_alias(store, MODEL, CHAMPION, "v4", "ok", expected="v3").seq == 3


def test_legacy_pointer_without_sequence_keeps_working(store) -> None:
    legacy = {
        "model": MODEL,
        "alias": CHAMPION,
        "version": "v2",
        "previous": None,
        "at": "2026-01-01T00:00:00+00:00",
        "by": "old@host",
        "reason": "written by the first deploy code",
    }
    write_json_atomic(store, alias_url(store, MODEL, CHAMPION), legacy)
    write_json_atomic(
        store,
        store.url("models", MODEL, "aliases", "history", CHAMPION, "20260101T000000000000Z-ab.json"),
        legacy,
    )
    event = set_alias(store, MODEL, CHAMPION, "v3", "new code", expected="v2")
    assert event.seq == 1 and event.previous == "v2"
    assert [e.version for e in alias_history(store, MODEL)] == ["v2", "v3"]
    assert rollback(store, MODEL).version == "v2"


def test_concurrent_promotions_on_s3(s3_options) -> None:
    """The same compare-and-swap on S3: a conditional PUT (If-None-Match) creates each history event."""
    s3 = Store.from_url("s3://conveyor-test/reg", s3_options)
    fake_versions(s3, "a", "b", "c", "d", "e")
    set_alias(s3, MODEL, CHAMPION, "a", "start", expected=None)
    barrier = threading.Barrier(4)
    won, lost = [], []

    def promote(version: str) -> None:
        barrier.wait()
        try:
            set_alias(s3, MODEL, CHAMPION, version, "race", expected="a")
            won.append(version)
        except AliasConflict:
            lost.append(version)

    threads = [threading.Thread(target=promote, args=(v,)) for v in "bcde"]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(won) == 1 and len(lost) == 3
    assert [e.version for e in alias_history(s3, MODEL)] == ["a", won[0]]
    assert rollback(s3, MODEL).version == "a"


# --- rollback --------------------------------------------------------------------------------


def test_rollback_walks_back_through_history_and_never_flip_flops(store) -> None:
    for v, prev in (("v1", None), ("v2", "v1"), ("v3", "v2")):
        set_alias(store, MODEL, CHAMPION, v, "promote", expected=prev, action="promote")
    assert rollback(store, MODEL).version == "v2"
    assert rollback(store, MODEL).version == "v1"  # not back to v3, which was rolled back from
    with pytest.raises(RegistryError, match="no earlier version"):
        rollback(store, MODEL)
    assert rollback(store, MODEL, to="v3").version == "v3"
    with pytest.raises(RegistryError, match="already points"):
        rollback(store, MODEL, to="v3")
    history = alias_history(store, MODEL)
    assert [e.action for e in history] == [
        "promote",
        "promote",
        "promote",
        "rollback",
        "rollback",
        "rollback",
    ]
    assert rollback_target([]) is None


def test_rollback_and_models_commands(store, capsys) -> None:
    from conveyor.cli import main

    set_alias(store, MODEL, CHAMPION, "v1", "promote", expected=None, action="promote")
    assert main(["promote", "--storage-url", store.root, "--version", "v2", "--expect", "v1"]) == 0
    assert (
        main(["promote", "--storage-url", store.root, "--version", "v3", "--expect", "v1"]) == 1
    )  # stale expectation
    assert "AliasConflict" in capsys.readouterr().err
    assert main(["rollback", "--model", MODEL, "--storage-url", store.root]) == 0
    assert "v2 -> v1" in capsys.readouterr().out
    assert read_alias(store, MODEL).version == "v1"
    assert main(["models", "--storage-url", store.root, "--json", "--history"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert {v["version"] for v in listing["versions"]} == {f"v{i}" for i in range(8)}
    assert listing["aliases"]["champion"]["version"] == "v1"
    assert [e["action"] for e in listing["history"]] == ["promote", "promote", "rollback"]
    assert [v.aliases for v in list_versions(store, MODEL) if v.version == "v1"] == [["champion"]]


# --- the gate, on real models ------------------------------------------------------------------


def test_worse_challenger_is_refused_and_the_report_says_why(tmp_path, pipeline_run, dask_client) -> None:
    trained, evaluation = variant(pipeline_run, dask_client, "weak")
    champion = pipeline_run.trained.version
    assert evaluation.champion is not None and evaluation.champion.version == champion
    assert evaluation.metrics.roc_auc < evaluation.champion.metrics.roc_auc
    store = fresh_store(tmp_path / "s", pipeline_run, champion, trained.version)
    local = dataclasses.replace(trained, model_url=store.model_url(MODEL, trained.version))

    result = deploy_stage.deploy(store, pipeline_run.cleaned, local, evaluation, GateParams(tolerance=0.001))

    assert not result.promoted and result.champion_after == champion
    assert f"champion {champion}" in result.reason and "<" in result.reason
    assert read_alias(store, MODEL).version == champion
    report = store.fs.cat(store.path(posixpath.join(local.model_url, "report.md"))).decode()
    assert (
        f"champion {champion}" in report and "challenger - champion" in report
    )  # side by side, with the delta
    assert "**FAIL**" in report and "NOT promoted" in report and result.reason in report


def test_guard_metric_regression_refuses_a_challenger(pipeline_run) -> None:
    from conveyor.tasks.evaluate import ChampionScore

    ours = pipeline_run.evaluation.metrics
    champ = dataclasses.replace(
        ours, roc_auc=ours.roc_auc - 0.01, calibration_error=ours.calibration_error - 0.05
    )
    evaluation = dataclasses.replace(pipeline_run.evaluation, champion=ChampionScore("older", champ))
    decision = deploy_stage.decide(evaluation, GateParams(guards={"calibration_error": 0.02, "f1": 0.03}))
    assert not decision.promote and "guard calibration_error" in decision.reason
    assert [c.passed for c in decision.checks] == [True, True, False, True]  # baseline, metric, 2 guards
    assert deploy_stage.decide(evaluation, GateParams(guards={"calibration_error": 0.06})).promote
    with pytest.raises(ValueError, match="not one of"):
        GateParams(guards={"auc": 0.1})


def test_concurrent_deploys_promote_exactly_one(tmp_path, pipeline_run, dask_client, monkeypatch) -> None:
    """Two runs that both pass the gate against the same champion, their compare-and-swaps overlapping:
    both read the champion before either writes, one promotes, the other is told it lost."""
    import conveyor.store.registry as registry

    alt, alt_eval = variant(pipeline_run, dask_client, "alt")
    champion = pipeline_run.trained.version
    store = fresh_store(tmp_path / "s", pipeline_run, champion, alt.version)
    local = dataclasses.replace(alt, model_url=store.model_url(MODEL, alt.version))
    passing = dataclasses.replace(
        alt_eval,
        champion=dataclasses.replace(
            alt_eval.champion,
            metrics=dataclasses.replace(alt_eval.metrics, roc_auc=alt_eval.metrics.roc_auc - 0.01),
        ),
    )
    # The overlap, made certain: set_alias's read of the current pointer returns in both threads only
    # once both have read it, so both build event #2 on top of the same champion.
    both_read = threading.Barrier(2, timeout=60)
    real_read_alias = registry.read_alias

    def read_then_wait(*args, **kwargs):
        current = real_read_alias(*args, **kwargs)
        both_read.wait()
        return current

    monkeypatch.setattr(registry, "read_alias", read_then_wait)
    # The same challenger twice stands in for two runs racing with equally good models.
    results, errors = [], []

    def run() -> None:
        try:
            results.append(deploy_stage.deploy(store, pipeline_run.cleaned, local, passing, GateParams()))
        except Exception as exc:  # a broken barrier lands here: the test fails below
            errors.append(repr(exc))

    threads = [threading.Thread(target=run) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == []
    assert sorted(r.promoted for r in results) == [False, True]
    loser = next(r for r in results if not r.promoted)
    assert loser.champion_before == champion  # it had passed the gate against the same champion ...
    assert loser.reason.startswith("lost a concurrent promotion")  # ... and lost the swap itself
    assert "at the same moment (event 2 already exists)" in loser.reason
    assert [e.version for e in alias_history(store, MODEL)] == [champion, alt.version]


def test_deploy_refuses_when_evaluated_against_another_champion(tmp_path, pipeline_run, dask_client) -> None:
    alt, alt_eval = variant(pipeline_run, dask_client, "alt")
    store = fresh_store(tmp_path / "s", pipeline_run, pipeline_run.trained.version, alt.version)
    fake_versions(store, "newer")
    set_alias(store, MODEL, CHAMPION, "newer", "someone promoted meanwhile")
    local = dataclasses.replace(alt, model_url=store.model_url(MODEL, alt.version))
    result = deploy_stage.deploy(store, pipeline_run.cleaned, local, alt_eval, GateParams(tolerance=1.0))
    assert not result.promoted and "re-evaluate" in result.reason
    assert read_alias(store, MODEL).version == "newer"
