"""The model server over real HTTP: a real uvicorn on a loopback port, real model files, a real webhook
receiver.

Every server, thread and receiver started here is stopped in its fixture's teardown.
"""

from __future__ import annotations

import json
import posixpath
import threading

import dask.dataframe as dd
import httpx
import numpy as np
import pytest

from conveyor.serving import ModelHolder, create_app, start_in_thread
from conveyor.store.registry import CHAMPION, read_card, register_card, set_alias
from conveyor.store.storage import write_bytes_atomic
from conveyor.tasks.train import categorize, load_booster, predict_dask
from tests.support import MODEL, fresh_store, variant, wait_for

TOKEN = "test-token-not-a-secret"


@pytest.fixture
def registry(tmp_path, pipeline_run, dask_client):
    """A store with the session's model as champion and a second good model registered beside it."""
    alt, _ = variant(pipeline_run, dask_client, "alt")
    store = fresh_store(tmp_path / "store", pipeline_run, pipeline_run.trained.version, alt.version)
    return store, pipeline_run.trained.version, alt.version


@pytest.fixture
def server(registry, alert_receiver):
    store, _, _ = registry
    holder = ModelHolder(store, MODEL)
    running = start_in_thread(create_app(holder, poll_seconds=0.1, token=TOKEN))
    client = httpx.Client(base_url=running.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    try:
        yield client, holder, running
    finally:
        client.close()
        running.stop()
    assert not running.thread.is_alive()


@pytest.fixture(scope="module")
def holdout_rows(pipeline_run):
    """200 real silver rows as JSON records (category names, NaN -> null), as a client would send them."""
    raw = dd.read_parquet(
        [posixpath.join(pipeline_run.cleaned.silver.url, "part-00000.parquet")],
        columns=pipeline_run.trained.features,
    ).head(200)
    return json.loads(raw.to_json(orient="records"))


def test_predict_matches_the_evaluate_path(server, holdout_rows, pipeline_run, dask_client) -> None:
    client, _, running = server
    resp = client.post("/predict/features", json={"rows": holdout_rows})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["version"] == pipeline_run.trained.version and len(body["probabilities"]) == len(holdout_rows)
    # Same rows through the cluster's path (categorize with the recorded categories + xgboost.dask).
    import pandas as pd

    frame = pd.DataFrame(holdout_rows)
    for col in pipeline_run.trained.categories:
        frame[col] = frame[col].astype("string")
    encoded = categorize(dd.from_pandas(frame, npartitions=2), pipeline_run.trained.categories)
    booster = load_booster(pipeline_run.store, pipeline_run.trained.model_url)
    expected = np.asarray(
        predict_dask(dask_client, booster, encoded[pipeline_run.trained.features]).compute()
    )
    np.testing.assert_allclose(body["probabilities"], expected, rtol=1e-6, atol=1e-7)
    threshold = body["threshold"]
    assert body["predictions"] == [int(p >= threshold) for p in body["probabilities"]]

    info = client.get("/model").json()
    assert info["version"] == pipeline_run.trained.version and info["card"]["metrics"]["roc_auc"] > 0.5
    health = httpx.get(f"{running.url}/health").json()  # no token needed for probes
    assert health["status"] == "ok" and health["version"] == pipeline_run.trained.version


def test_bearer_token_is_required(server, holdout_rows) -> None:
    client, _, running = server
    assert httpx.post(f"{running.url}/predict", json={"rows": holdout_rows[:1]}).status_code == 401
    wrong = httpx.post(
        f"{running.url}/predict", json={"rows": holdout_rows[:1]}, headers={"Authorization": "Bearer nope"}
    )
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{running.url}/model").status_code == 401
    assert client.post("/predict/features", json={"rows": holdout_rows[:1]}).status_code == 200


def test_malformed_payloads_get_422_naming_the_field(server, holdout_rows) -> None:
    client, _, _ = server
    missing = {k: v for k, v in holdout_rows[0].items() if k != "distance"}
    resp = client.post("/predict/features", json={"rows": [holdout_rows[1], missing]})
    assert resp.status_code == 422
    [error] = resp.json()["detail"]
    assert error["loc"] == ["body", "rows", 1, "distance"] and "distance" in error["msg"]

    wrong_type = dict(holdout_rows[0], carrier=7, temp="warm")
    fields = {
        e["loc"][-1] for e in client.post("/predict/features", json={"rows": [wrong_type]}).json()["detail"]
    }
    assert fields == {"carrier", "temp"}

    for body in ({"rows": []}, {"rows": "x"}, {"nope": 1}, [1, 2]):
        resp = client.post("/predict/features", json=body)
        assert resp.status_code == 422 and resp.json()["detail"], body
    resp = client.post(
        "/predict/features", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == 422 and resp.json()["detail"][0]["type"] == "json_invalid"
    # Unknown categories and nulls are scored as missing values, as in training.
    odd = dict(holdout_rows[0], dest="ZZZ", temp=None)
    assert client.post("/predict/features", json={"rows": [odd]}).status_code == 200


def test_hot_reload_under_load_fails_no_request(server, registry, holdout_rows) -> None:
    client, holder, running = server
    store, champion, challenger = registry
    stop = threading.Event()
    failures: list[str] = []
    versions: list[list[str]] = [[] for _ in range(4)]

    def load(i: int) -> None:
        with httpx.Client(
            base_url=running.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60
        ) as c:
            for n in range(3000):  # bounded, whatever happens
                if stop.is_set():
                    return
                rows = holdout_rows[: 1 + (n % 50)]
                try:
                    resp = c.post("/predict/features", json={"rows": rows})
                    if resp.status_code != 200 or len(resp.json()["probabilities"]) != len(rows):
                        failures.append(f"{resp.status_code}: {resp.text[:200]}")
                    else:
                        versions[i].append(resp.json()["version"])
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    try:
        wait_for(lambda: sum(map(len, versions)) >= 40, "requests on the first model")
        set_alias(store, MODEL, CHAMPION, challenger, "hot reload test", expected=champion)
        wait_for(lambda: any(v and v[-1] == challenger for v in versions), "a response from the new model")
        seen = sum(map(len, versions))
        wait_for(lambda: sum(map(len, versions)) >= seen + 40, "requests after the swap")
    finally:
        stop.set()
        [t.join() for t in threads]
    assert failures == []
    assert holder.reloads == 2 and client.get("/model").json()["version"] == challenger
    for seq in versions:  # each client saw the old model, then only the new one
        switched = seq.index(challenger) if challenger in seq else len(seq)
        assert set(seq[:switched]) <= {champion} and set(seq[switched:]) <= {challenger}


def test_broken_artifact_keeps_the_old_model_serving_and_alerts(
    server, registry, holdout_rows, alert_receiver
) -> None:
    client, holder, _ = server
    store, champion, _ = registry
    broken = "brokenbroken0001"
    card = read_card(store, MODEL, champion) | {"version": broken}
    write_bytes_atomic(
        store, posixpath.join(store.model_url(MODEL, broken), "model.ubj"), b"\x00truncated upload"
    )
    register_card(store, MODEL, broken, card)

    set_alias(store, MODEL, CHAMPION, broken, "bad push", expected=champion)
    [alert] = wait_for(
        lambda: [a for a in alert_receiver if a["kind"] == "serving.reload_failed"], "the alert"
    )
    assert alert["details"]["version"] == broken and alert["details"]["serving"] == champion
    assert "model.ubj" in alert["details"]["error"]

    resp = client.post("/predict/features", json={"rows": holdout_rows[:5]})
    assert resp.status_code == 200 and resp.json()["version"] == champion
    health = client.get("/health").json()
    assert (
        health["version"] == champion and health["failed_version"] == broken and health["status"] == "stale"
    )
    assert "model.ubj" not in json.dumps(health)  # the open probe shows a status word, never paths or errors
    assert not any(holder.check() for _ in range(5))  # more polls of the same broken version...
    assert (
        len([a for a in alert_receiver if a["kind"] == "serving.reload_failed"]) == 1
    )  # ...alert once, not per poll

    set_alias(store, MODEL, CHAMPION, champion, "undo the bad push", expected=broken, action="rollback")
    assert wait_for(lambda: client.get("/health").json()["failed_version"] is None, "recovery")
