"""The model server is closed by default and total over its input (issue 16, items 5 to 8).

A small real XGBoost model in a temp store, a real uvicorn on a loopback port, a real
webhook receiver; property-based tests (hypothesis) over the request parser. Every
server started here is stopped in its fixture's teardown.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import threading
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conveyor.serving import (
    FLOAT32_MAX,
    TOKEN_ENV,
    ModelHolder,
    Rejected,
    ServingConfigError,
    create_app,
    encode_predict_body,
    parse_predict_body,
    start_in_thread,
)
from conveyor.store.registry import CHAMPION, ModelLoadError, set_alias
from conveyor.store.storage import Store, write_bytes_atomic
from conveyor.tasks.loading import LoadedModel, load_model
from conveyor.tasks.scoring import category_codes, feature_matrix, rows_to_frame
from tests.support import TINY_CATEGORIES as CATEGORIES
from tests.support import TINY_FEATURES as FEATURES
from tests.support import TINY_MODEL as MODEL
from tests.support import tiny_champion_store, tiny_model, wait_for

TOKEN = "serving-token-for-tests-only"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROW = {"distance": 1.0, "temp": None, "carrier": "AA"}
JSON = {"Content-Type": "application/json"}


@pytest.fixture
def store(tmp_path) -> Store:
    return tiny_champion_store(tmp_path)


@pytest.fixture
def served(store, alert_receiver) -> Iterator[tuple[httpx.Client, ModelHolder, str]]:
    holder = ModelHolder(store, MODEL)
    running = start_in_thread(create_app(holder, poll_seconds=0.05, token=TOKEN))
    client = httpx.Client(base_url=running.url, headers=AUTH, timeout=60)
    try:
        yield client, holder, running.url
    finally:
        client.close()
        running.stop()
    assert not running.thread.is_alive()


def _alerts(received: list[dict], version: str) -> list[dict]:
    return [
        a for a in received if a["kind"] == "serving.reload_failed" and a["details"]["version"] == version
    ]


# --- item 6: closed by default ----------------------------------------------------------------


@pytest.mark.parametrize("value", [None, "", "   ", "change-me", "short"])
def test_no_usable_token_no_server(store, monkeypatch, value) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    if value is not None:
        monkeypatch.setenv(TOKEN_ENV, value)
    with pytest.raises(ServingConfigError, match=TOKEN_ENV):
        create_app(ModelHolder(store, MODEL))


def test_the_cli_refuses_to_serve_without_a_token(store, monkeypatch, capsys) -> None:
    from conveyor.cli import main

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    args = ["serve", "--storage-url", store.root, "--model", MODEL, "--port", "1"]
    assert main(args) != 0
    assert "--insecure-no-token" in capsys.readouterr().err
    assert main([*args, "--insecure-no-token", "--host", "0.0.0.0"]) != 0
    assert "loopback only" in capsys.readouterr().err


def test_insecure_no_token_serves_on_loopback_only(store, monkeypatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    app = create_app(ModelHolder(store, MODEL), insecure_no_token=True)
    with pytest.raises(ServingConfigError, match="loopback only"):
        start_in_thread(app, host="0.0.0.0")
    running = start_in_thread(app)
    try:
        assert httpx.post(f"{running.url}/predict/features", json={"rows": [ROW]}).status_code == 200
        for path in ("/docs", "/redoc", "/openapi.json"):  # no token: no schema, no docs
            assert httpx.get(f"{running.url}{path}").status_code == 404
    finally:
        running.stop()


def test_docs_and_schema_are_behind_the_token(served) -> None:
    client, _, url = served
    assert httpx.get(f"{url}/openapi.json").status_code == 401
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/predict", "/predict/features", "/health"}
    for path in ("/docs", "/redoc"):
        assert client.get(path).status_code == 404


def test_open_endpoints_show_a_status_word_never_paths_or_errors(tmp_path, alert_receiver) -> None:
    """Nothing loadable: /health and the 503 carry a status word and versions only."""
    store = Store.from_url(str(tmp_path / "store"))
    tiny_model(store, "bad", card={"metrics": {"threshold": "high"}})
    set_alias(store, MODEL, CHAMPION, "bad", "test set-up", expected=None)
    running = start_in_thread(create_app(ModelHolder(store, MODEL), poll_seconds=0.05, token=TOKEN))
    try:
        health = httpx.get(f"{running.url}/health")
        refused = httpx.post(f"{running.url}/predict", json={"rows": [ROW]}, headers=AUTH)
    finally:
        running.stop()
    assert health.json()["status"] == "no_model" and health.json()["failed_version"] == "bad"
    assert refused.status_code == 503 and refused.json()["detail"] == {"status": "no_model", "version": None}
    for text in (health.text, refused.text):
        assert str(tmp_path) not in text and "Error" not in text and "threshold" not in text
    assert "threshold" in _alerts(alert_receiver, "bad")[0]["details"]["error"]  # the operator gets the text


# --- item 5: the watcher survives any error -------------------------------------------------


def test_watcher_survives_bad_cards_alerts_once_and_reports_stale(served, store, alert_receiver) -> None:
    client, holder, url = served
    tiny_model(store, "v2", card={"metrics": {"threshold": "high"}})  # float("high"): ValueError
    set_alias(store, MODEL, CHAMPION, "v2", "bad push", expected="v1")
    wait_for(lambda: _alerts(alert_receiver, "v2"), "the alert for v2")
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "stale" and health["version"] == "v1" and health["failed_version"] == "v2"
    assert client.post("/predict/features", json={"rows": [ROW]}).json()["version"] == "v1"

    # A non-UTF-8 card (UnicodeDecodeError, not a ModelLoadError) while v2 is still being polled.
    tiny_model(store, "v3", seed=3)
    card = posixpath.join(store.model_url(MODEL, "v3"), "card.json")
    write_bytes_atomic(store, card, b'{"features": "\xff"}')
    set_alias(store, MODEL, CHAMPION, "v3", "another bad push", expected="v2")
    wait_for(lambda: _alerts(alert_receiver, "v3"), "the alert for v3")
    assert httpx.get(f"{url}/health").json()["failed_version"] == "v3"

    # An error nobody foresaw, raised by the loader itself.
    import conveyor.serving as serving

    real = serving.load_model

    def boom(store, model, version):
        if version == "v4":
            raise ZeroDivisionError("a bug")
        return real(store, model, version)

    serving.load_model = boom
    try:
        tiny_model(store, "v4", seed=4)
        set_alias(store, MODEL, CHAMPION, "v4", "third bad push", expected="v3")
        wait_for(lambda: _alerts(alert_receiver, "v4"), "the alert for v4")
    finally:
        serving.load_model = real

    # Back to a version already alerted about: no second alert. Then a good one goes live.
    set_alias(store, MODEL, CHAMPION, "v2", "flip back", expected="v4")
    wait_for(lambda: httpx.get(f"{url}/health").json()["failed_version"] == "v2", "v2 polled again")
    tiny_model(store, "v5", seed=5)
    set_alias(store, MODEL, CHAMPION, "v5", "a good one", expected="v2")
    wait_for(
        lambda: client.post("/predict/features", json={"rows": [ROW]}).json()["version"] == "v5", "v5 live"
    )
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["failed_version"] is None
    assert [len(_alerts(alert_receiver, v)) for v in ("v2", "v3", "v4")] == [1, 1, 1]


def test_a_bad_card_at_start_up_does_not_stop_the_server(tmp_path, alert_receiver) -> None:
    store = Store.from_url(str(tmp_path / "store"))
    tiny_model(store, "v1", card={"features": "not a list", "metrics": {"threshold": [0.5]}})
    set_alias(store, MODEL, CHAMPION, "v1", "test set-up", expected=None)
    write_bytes_atomic(store, posixpath.join(store.model_url(MODEL, "v1"), "card.json"), b"\xff\xfe\x00")
    holder = ModelHolder(store, MODEL)
    running = start_in_thread(create_app(holder, poll_seconds=0.05, token=TOKEN))
    try:
        assert httpx.get(f"{running.url}/health").json()["status"] == "no_model"
        tiny_model(store, "v2", seed=2)
        set_alias(store, MODEL, CHAMPION, "v2", "fixed", expected="v1")
        wait_for(lambda: httpx.get(f"{running.url}/health").json()["status"] == "ok", "the fixed model")
    finally:
        running.stop()


# --- item 8: integrity on load -----------------------------------------------------------------


def test_the_model_checksum_is_verified_on_every_load(store) -> None:
    v1 = load_model(store, MODEL, "v1")
    assert (
        v1.raw
        and hashlib.sha256(v1.raw).hexdigest()
        == json.loads(store.fs.cat(store.path(posixpath.join(store.model_url(MODEL, "v1"), "train.json"))))[
            "model_sha256"
        ]
    )
    tiny_model(store, "v2", seed=2)
    # Swap in another valid model of the same shape: it would load and pass the smoke test.
    write_bytes_atomic(store, posixpath.join(store.model_url(MODEL, "v2"), "model.ubj"), v1.raw)
    with pytest.raises(ModelLoadError, match="sha256 does not match"):
        load_model(store, MODEL, "v2")

    tiny_model(store, "v3", seed=3)
    store.fs.rm(store.path(posixpath.join(store.model_url(MODEL, "v3"), "train.json")))
    with pytest.raises(ModelLoadError, match="no model_sha256"):
        load_model(store, MODEL, "v3")


@pytest.mark.parametrize("model_file", ["../v1/model.ubj", "/ABSOLUTE"])
def test_model_file_from_the_card_stays_in_its_version_folder(store, model_file) -> None:
    v1 = posixpath.join(store.path(store.model_url(MODEL, "v1")), "model.ubj")
    model_file = model_file.replace("/ABSOLUTE", v1)
    raw = tiny_model(store, "v2", seed=2, card={"model_file": model_file})
    assert raw  # v2's own artifact is beside its card; the card names another one
    with pytest.raises(ModelLoadError, match="refused"):
        load_model(store, MODEL, "v2")


# --- item 7: /predict input ------------------------------------------------------------------


def test_oversized_bodies_get_413_streamed_or_not(served) -> None:
    client, _, _ = served
    big = b'{"rows": [' + b" " * (30 << 20) + b"]}"
    assert client.post("/predict/features", content=big, headers=JSON).status_code == 413

    def chunks():
        for _ in range(30):
            yield b" " * (1 << 20)

    assert (
        client.post("/predict/features", content=chunks(), headers=JSON).status_code == 413
    )  # no Content-Length
    assert client.post("/predict/features", json={"rows": [ROW]}).status_code == 200  # and the server is fine


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (json.dumps({"rows": [ROW]}), "text/plain", 415),
        ("rows=1", "application/x-www-form-urlencoded", 415),
        (json.dumps({"rows": [ROW]}), None, 415),
        ("[" * 100_000, "application/json", 422),
        ("[" * 900 + "]" * 900, "application/json", 422),
        (
            '{"rows": [{"distance": ' + "9" * 400 + ', "temp": null, "carrier": "AA"}]}',
            "application/json",
            422,
        ),
        (
            '{"rows": [{"distance": ' + "9" * 5000 + ', "temp": null, "carrier": "AA"}]}',
            "application/json",
            422,
        ),
        ('{"rows": [{"distance": 1e39, "temp": null, "carrier": "AA"}]}', "application/json", 422),
        ('{"rows": [{"distance": -1e39, "temp": null, "carrier": "AA"}]}', "application/json", 422),
        ('{"rows": [{"distance": Infinity, "temp": NaN, "carrier": "AA"}]}', "application/json", 422),
        ('{"rows": [{"distance": [[[1]]], "temp": {}, "carrier": 7}]}', "application/json", 422),
        ('{"rows": [{"distance": true, "temp": "3", "carrier": ["AA"]}]}', "application/json", 422),
        ('"\\ud800"', "application/json", 422),
        ('{"rows": [{"distance": 1, "temp": null, "carrier": "\\ud800"}]}', "application/json", 422),
        (b'{"rows": "\xff"}', "application/json", 422),
    ],
)
def test_bad_input_gets_4xx_never_500(served, body, content_type, status) -> None:
    client, _, _ = served
    headers = {"Content-Type": content_type} if content_type else {}
    resp = client.post(
        "/predict/features", content=body if isinstance(body, bytes) else body.encode(), headers=headers
    )
    assert resp.status_code == status, resp.text[:300]
    assert client.post("/predict/features", json={"rows": [ROW]}).status_code == 200


def test_the_declared_routes_answer_as_the_direct_handlers_do(store, alert_receiver, monkeypatch) -> None:
    """A POST to a prediction route skips FastAPI's stack (``ServingApp.direct``); the same request
    through FastAPI's declared route (the one the OpenAPI document lists) gets the same answer."""
    from fastapi import FastAPI

    monkeypatch.setenv("CONVEYOR_SERVING_MAX_BODY_BYTES", "4096")
    direct_app = create_app(ModelHolder(store, MODEL), poll_seconds=0.05, token=TOKEN)
    declared_app = create_app(ModelHolder(store, MODEL), poll_seconds=0.05, token=TOKEN)

    async def through_fastapi(scope, receive, send) -> None:
        await FastAPI.__call__(declared_app, scope, receive, send)

    through_fastapi.state = declared_app.state
    requests = [
        ("/predict/features", {"json": {"rows": [ROW]}}),
        ("/predict/features", {"json": {"columns": {name: [value] for name, value in ROW.items()}}}),
        ("/predict/features", {"json": {"rows": [ROW]}, "headers": {"Authorization": "Bearer wrong"}}),
        ("/predict/features", {"json": {"rows": [ROW]}, "headers": {"Authorization": ""}}),
        ("/predict/features", {"content": b'{"rows": []', "headers": JSON}),
        (
            "/predict/features",
            {"content": json.dumps({"rows": [ROW]}), "headers": {"Content-Type": "text/plain"}},
        ),
        ("/predict/features", {"content": b" " * 5000, "headers": JSON}),
        ("/predict/features", {"json": {"rows": [dict(ROW, distance=True)]}}),
        ("/predict", {"json": {"rows": [ROW]}}),  # a model without a spec: feature rows only (409)
    ]
    direct, declared = start_in_thread(direct_app), start_in_thread(through_fastapi)
    try:
        answers = []
        for running in (direct, declared):
            with httpx.Client(base_url=running.url, headers=AUTH, timeout=60) as client:
                responses = [client.post(path, **kwargs) for path, kwargs in requests]
            answers.append(
                [
                    (r.status_code, r.json(), r.headers.get("www-authenticate"), r.headers["content-type"])
                    for r in responses
                ]
            )
    finally:
        direct.stop()
        declared.stop()
    assert [a[0] for a in answers[0]] == [200, 200, 401, 401, 422, 415, 413, 422, 409]
    assert answers[0] == answers[1]


def test_float32_bounds_are_inclusive(served) -> None:
    client, _, _ = served
    edge = dict(ROW, distance=FLOAT32_MAX, temp=-FLOAT32_MAX)
    resp = client.post("/predict/features", json={"rows": [edge]})
    assert resp.status_code == 200 and np.isfinite(resp.json()["probabilities"]).all()


def test_requests_in_flight_are_limited(store, alert_receiver, monkeypatch) -> None:
    monkeypatch.setenv("CONVEYOR_SERVING_MAX_CONCURRENCY", "1")
    app = create_app(ModelHolder(store, MODEL), poll_seconds=0.05, token=TOKEN)
    running = start_in_thread(app)
    release = threading.Event()
    first: list[httpx.Response] = []

    def slow_body():
        yield b'{"rows": ['
        release.wait(60)
        yield json.dumps(ROW).encode() + b"]}"

    def send_slow():
        with httpx.Client(base_url=running.url, headers=AUTH | JSON, timeout=60) as c:
            first.append(c.post("/predict/features", content=slow_body()))

    sender = threading.Thread(target=send_slow)
    sender.start()
    try:
        wait_for(lambda: app.state.in_flight == 1, "the slow request to hold the only slot")
        with httpx.Client(base_url=running.url, headers=AUTH, timeout=60) as c:
            busy = c.post("/predict/features", json={"rows": [ROW]})
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            release.set()
            sender.join(timeout=60)
            assert first[0].status_code == 200
            assert c.post("/predict/features", json={"rows": [ROW]}).status_code == 200
    finally:
        release.set()
        sender.join(timeout=60)
        running.stop()


# --- item 7: properties of the request parser ----------------------------------------------------

PARSER_MODEL = LoadedModel(MODEL, "v", None, {}, FEATURES, CATEGORIES, 0.5)
LIMIT = 1 << 16
PROPERTY = settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(["\ud800", "a\udfffb", "AA"]),  # lone surrogates: valid JSON, not text
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(FEATURES) | st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=30,
)
numbers = (
    st.none()
    | st.integers(min_value=-(10**60), max_value=10**60)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.floats(min_value=-FLOAT32_MAX, max_value=FLOAT32_MAX)
)
rows = st.lists(
    st.fixed_dictionaries(
        {
            "distance": numbers,
            "temp": numbers,
            "carrier": st.none() | st.sampled_from(["AA", "UA", "ZZ", "\ud800"]),
        }
    ),
    min_size=1,
    max_size=5,
)


def _parse(body: bytes, content_type: str | None = "application/json") -> list | Rejected:
    try:
        return parse_predict_body(body, content_type, PARSER_MODEL, LIMIT)
    except Rejected as rejected:
        return rejected


def _check_accepted(parsed: list) -> None:
    frame = rows_to_frame(parsed, PARSER_MODEL)
    numeric = frame[["distance", "temp"]].to_numpy(dtype="float32")
    assert not np.isinf(numeric).any()  # missing (NaN) is fine; an inf would be scored


@PROPERTY
@given(body=st.binary(max_size=2048), content_type=st.sampled_from([None, "text/plain", "application/json"]))
def test_any_bytes_get_a_4xx_or_rows(body, content_type) -> None:
    parsed = _parse(body, content_type)
    if isinstance(parsed, Rejected):
        assert parsed.status in {413, 415, 422}
    else:
        _check_accepted(parsed)


@PROPERTY
@given(value=json_values)
def test_any_json_document_gets_a_4xx_or_rows(value) -> None:
    for document in (value, {"rows": value}, {"rows": [value]}):
        body = json.dumps(document).encode()
        parsed = _parse(body)
        if isinstance(parsed, Rejected):
            assert parsed.status in {413, 422}
            assert isinstance(parsed.detail, list | str)
        else:
            _check_accepted(parsed)


@PROPERTY
@given(batch=rows)
def test_rows_are_accepted_exactly_when_every_number_fits_float32(batch) -> None:
    def fits(v) -> bool:
        return v is None or (not isinstance(v, float) or np.isfinite(v)) and -FLOAT32_MAX <= v <= FLOAT32_MAX

    parsed = _parse(json.dumps({"rows": batch}).encode())
    expected = all(fits(r["distance"]) and fits(r["temp"]) and r["carrier"] != "\ud800" for r in batch)
    assert isinstance(parsed, list) == expected, parsed
    if isinstance(parsed, list):
        _check_accepted(parsed)
    else:
        assert parsed.status == 422 and all(e["loc"][-1] in FEATURES for e in parsed.detail)


def _encode(body: bytes) -> np.ndarray | Rejected:
    try:
        return encode_predict_body(
            body, "application/json", PARSER_MODEL, LIMIT, category_codes(PARSER_MODEL.categories)
        )
    except Rejected as rejected:
        return rejected


def _same_as_the_frame_path(body: bytes) -> None:
    """The route's numpy encoding gives rows_to_frame's matrix, or the very same rejection."""
    expected, got = _parse(body), _encode(body)
    if isinstance(expected, Rejected):
        assert isinstance(got, Rejected) and (got.status, got.detail) == (expected.status, expected.detail)
    else:
        assert isinstance(got, np.ndarray) and got.dtype == np.float32
        np.testing.assert_array_equal(got, rows_to_frame(expected, PARSER_MODEL).to_numpy(dtype="float32"))


@PROPERTY
@given(batch=rows)
def test_numpy_encoding_equals_the_frame_path_on_rows(batch) -> None:
    _same_as_the_frame_path(json.dumps({"rows": batch}).encode())


@PROPERTY
@given(value=json_values)
def test_numpy_encoding_equals_the_frame_path_on_any_json(value) -> None:
    for document in (value, {"rows": value}, {"rows": [value]}):
        _same_as_the_frame_path(json.dumps(document).encode())


def test_plain_rows_take_the_numpy_path() -> None:
    codes = category_codes(PARSER_MODEL.categories)
    plain = [
        ROW,
        {"distance": 3, "temp": -2.5, "carrier": "UA"},
        {"distance": None, "temp": 1e30, "carrier": "ZZ"},
    ]
    matrix = feature_matrix(plain, PARSER_MODEL, codes)
    assert matrix is not None
    np.testing.assert_array_equal(matrix, rows_to_frame(plain, PARSER_MODEL).to_numpy(dtype="float32"))
    for odd in (
        {"distance": True},
        {"temp": float("nan")},
        {"distance": 2**60},
        {"carrier": 7},
        {"temp": 1e39},
    ):
        assert feature_matrix([dict(ROW, **odd)], PARSER_MODEL, codes) is None  # validation words those
