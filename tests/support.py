"""Helpers shared by several test modules (fixtures live in conftest.py; no test imports another)."""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd

from conveyor.settings import DEFAULT_MODEL
from conveyor.store.registry import CHAMPION, register_card, set_alias
from conveyor.store.storage import Store, write_bytes_atomic, write_json_atomic
from conveyor.tasks import deploy as deploy_stage
from conveyor.tasks import evaluate as evaluate_stage
from conveyor.tasks import train as train_stage

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_ROWS = 60_000  # enough flights for a stable lift over the baseline, small enough to be quick
MODEL = DEFAULT_MODEL
# A raw, unlabelled flight as a client sends it to POST /predict (no arr_delay or other post-departure field).
FLIGHT = {
    "year": 2013,
    "month": 11,
    "day": 5,
    "sched_dep_time": 1350,
    "sched_arr_time": 1531,
    "carrier": "EV",
    "flight": 5465,
    "tailnum": "N614QX",
    "origin": "LGA",
    "dest": "MSN",
    "distance": 812,
    "hour": 13,
    "minute": 50,
    "time_hour": "2013-11-05T18:00:00Z",
}
WAIT_S = 60.0  # how long to wait for a watcher to act; a bound for a hung test, not a timing assertion


def source_with(base: Path, dest: Path, flights: pd.DataFrame) -> Path:
    """A copy of ``base`` whose flights table is ``flights``."""
    dest.mkdir(parents=True, exist_ok=True)
    for item in base.iterdir():
        if item.name != "flights.csv":
            shutil.copy(item, dest / item.name)
    flights.to_csv(dest / "flights.csv", index=False)
    return dest


def allow_roots(monkeypatch, *roots: object, schedulers: tuple[str, ...] = ()) -> dict[str, str]:
    """What the operator allows (conveyor/operator.py) for the roots a test names in parameters: storage,
    source (plus the packaged flights) and replica prefixes, and scheduler addresses. Set in this
    process's environment; returned for a subprocess's."""
    from conveyor.tasks.ingest import packaged_source_url

    prefixes = ",".join(str(r) for r in roots)
    env = {
        "CONVEYOR_ALLOWED_STORAGE_PREFIXES": prefixes,
        "CONVEYOR_ALLOWED_SOURCE_PREFIXES": f"{prefixes},{packaged_source_url()}",
        "CONVEYOR_ALLOWED_REPLICA_PREFIXES": prefixes,
    }
    if schedulers:
        env["CONVEYOR_ALLOWED_SCHEDULERS"] = ",".join(schedulers)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def file_stamps(folder: Path | str) -> dict[str, tuple[int, int]]:
    """Every file under a local ``folder`` with its (inode, mtime_ns): a rewrite or a new file shows."""
    folder = Path(folder)
    return {
        str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def wait_for(condition, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}")


_VARIANTS: dict[tuple[str, str], tuple] = {}
VARIANT_PARAMS = {
    # A second, slightly different good model (a challenger for hot reloads).
    "alt": train_stage.TrainParams(num_boost_round=200, max_depth=3, seed=7),
    # A clearly worse one: a handful of depth-1 trees.
    "weak": train_stage.TrainParams(num_boost_round=3, max_depth=1, learning_rate=0.05, seed=11),
}


def variant(pipeline_run, dask_client, name: str):
    """(trained, evaluation) of another model on the session's data, evaluated against the session's champion.

    Trained and registered in the shared store (a new version folder; no alias moves).
    Cached per session process: train is content-versioned, evaluate is not free.
    """
    key = (pipeline_run.store.root, name)
    if key not in _VARIANTS:
        store, cleaned = pipeline_run.store, pipeline_run.cleaned
        trained = train_stage.train(store, cleaned, dask_client, VARIANT_PARAMS[name])
        champion = pipeline_run.trained
        evaluation = evaluate_stage.evaluate(
            store,
            cleaned,
            trained,
            dask_client,
            champion_url=champion.model_url,
            champion_version=champion.version,
        )
        deploy_stage.register(store, cleaned, trained, evaluation)
        _VARIANTS[key] = (trained, evaluation)
    return _VARIANTS[key]


def copy_version(src: Store, dst: Store, model: str, version: str) -> None:
    src.fs.get(
        src.path(src.model_url(model, version)), dst.path(dst.model_url(model, version)), recursive=True
    )


def fresh_store(root: Path, pipeline_run, *versions: str, champion: str | None = None) -> Store:
    """A new local store holding copies of registered ``versions``, with ``champion`` (default: the first)
    set."""
    store = Store.from_url(root.as_uri())
    for v in versions:
        copy_version(pipeline_run.store, store, MODEL, v)
    set_alias(store, MODEL, CHAMPION, champion or versions[0], "test set-up", expected=None, action="promote")
    return store


def fake_versions(store: Store, *versions: str, model: str = MODEL) -> None:
    """Registered versions with a dummy artifact: enough for alias tests, which never load the model."""
    for v in versions:
        write_bytes_atomic(store, posixpath.join(store.model_url(model, v), "model.ubj"), b"not a model")
        register_card(
            store, model, v, {"model": model, "version": v, "registered_at": v, "metrics": {"roc_auc": 0.7}}
        )


# A 5-tree model on random data under its own name: serving tests that need a model, not the pipeline.
TINY_MODEL = "tiny_model"
TINY_FEATURES = ["distance", "temp", "carrier"]  # two numeric features, one categorical (as in the flagship)
TINY_CATEGORIES = {"carrier": ["AA", "UA"]}


def tiny_model(store: Store, version: str, seed: int = 0, card: dict | None = None) -> bytes:
    """Train, write and register a 5-tree model on random data; returns its artifact bytes."""
    import xgboost as xgb

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(200, 3)).astype("float32")
    x[:, 2] = rng.integers(0, 2, 200)
    y = (x[:, 0] + rng.normal(size=200) > 0).astype(int)
    data = xgb.DMatrix(
        x, label=y, feature_names=TINY_FEATURES, feature_types=["q", "q", "c"], enable_categorical=True
    )
    raw = bytes(
        xgb.train({"objective": "binary:logistic", "max_depth": 2, "nthread": 1}, data, 5).save_raw("ubj")
    )
    base = store.model_url(TINY_MODEL, version)
    write_bytes_atomic(store, posixpath.join(base, "model.ubj"), raw)
    info = {
        "model_file": "model.ubj",
        "model_bytes": len(raw),
        "model_sha256": hashlib.sha256(raw).hexdigest(),
    }
    write_json_atomic(store, posixpath.join(base, "train.json"), info)
    good = {
        "model": TINY_MODEL,
        "version": version,
        "registered_at": version,
        "features": TINY_FEATURES,
        "categories": TINY_CATEGORIES,
        "metrics": {"threshold": 0.5, "roc_auc": 0.7},
        "model_file": "model.ubj",
    }
    register_card(store, TINY_MODEL, version, good | (card or {}))
    return raw


def tiny_champion_store(root: Path) -> Store:
    """A store under ``root`` whose champion is the tiny model, version ``v1``."""
    store = Store.from_url(str(root / "store"))
    tiny_model(store, "v1")
    set_alias(store, TINY_MODEL, CHAMPION, "v1", "test set-up", expected=None, action="promote")
    return store


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a process started in its own session (``start_new_session=True``) with everything it spawned:
    SIGTERM to the group, SIGKILL after 30 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
