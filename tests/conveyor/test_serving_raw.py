"""Raw rows over real HTTP: the server computes features with the spec's own code; the OpenAPI is typed."""

from __future__ import annotations

import httpx
import pytest

from conveyor.serving import ModelHolder, create_app, start_in_thread
from conveyor.store.storage import Store
from conveyor.tasks.inference import featurize_rows, featurizer_for_card
from conveyor.tasks.loading import load_model
from conveyor.tasks.scoring import encode_known, predict_frame
from tests.support import FLIGHT, MODEL, fresh_store

TOKEN = "test-token-not-a-secret"


@pytest.fixture
def served(tmp_path, pipeline_run):
    store: Store = fresh_store(tmp_path / "store", pipeline_run, pipeline_run.trained.version)
    # Raw rows need the lookup tables of the model's training data: the bronze versions it was cleaned from.
    for rel in ("datasets", "quarantine"):
        pipeline_run.store.fs.get(
            pipeline_run.store.path(pipeline_run.store.url(rel)), store.path(store.url(rel)), recursive=True
        )
    running = start_in_thread(create_app(ModelHolder(store, MODEL), poll_seconds=1, token=TOKEN))
    client = httpx.Client(base_url=running.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    try:
        yield client, store
    finally:
        client.close()
        running.stop()


def test_a_raw_flight_gets_the_probability_the_feature_code_gives(served, pipeline_run) -> None:
    client, _ = served
    rows = [
        FLIGHT,
        dict(FLIGHT, carrier="DL", dest="ATL", tailnum=None),
        {k: v for k, v in FLIGHT.items() if k not in ("flight", "tailnum")},
    ]
    resp = client.post("/predict", json={"rows": rows})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    model = load_model(pipeline_run.store, MODEL, pipeline_run.trained.version)
    features, problems = featurize_rows(featurizer_for_card(pipeline_run.store, model.card), rows)
    expected = predict_frame(model, encode_known(features[model.features], model.categories))
    assert problems == [] and body["task"] == "binary" and body["version"] == model.version
    assert body["probabilities"] == pytest.approx(expected.tolist(), abs=1e-6)
    assert set(body["lookup_versions"]) == {"weather", "planes", "airlines", "airports"}
    # the same flight sent as its feature vector gives the same answer on the features-only route
    feature_row = {k: (None if v != v else v) for k, v in features[model.features].iloc[0].to_dict().items()}
    same = client.post("/predict/features", json={"rows": [feature_row]}).json()
    assert same["probabilities"][0] == pytest.approx(body["probabilities"][0], abs=1e-6)


def test_a_row_that_would_be_quarantined_is_a_422_naming_the_rule(served) -> None:
    client, _ = served
    for row, field, words in [
        (dict(FLIGHT, carrier="ZZ"), "carrier", "carrier not in the airlines table"),
        (dict(FLIGHT, month=13), "month", "month outside 1..12"),
        (dict(FLIGHT, distance="far"), "distance", "cannot parse 'far' as float"),
        (dict(FLIGHT, arr_delay=12), "arr_delay", "unknown field"),
        ({k: v for k, v in FLIGHT.items() if k != "origin"}, "origin", "'origin' is required"),
    ]:
        resp = client.post("/predict", json={"rows": [row]})
        assert resp.status_code == 422, (field, resp.text)
        [detail] = resp.json()["detail"]
        assert detail["loc"] == ["body", "rows", 0, field] and words in detail["msg"], detail


def test_raw_rows_sent_as_columns_score_the_same_and_422s_name_column_and_row(served) -> None:
    client, _ = served
    rows = [FLIGHT, dict(FLIGHT, carrier="DL", dest="ATL", tailnum=None)]
    columns = {name: [row[name] for row in rows] for name in FLIGHT}
    by_rows = client.post("/predict", json={"rows": rows})
    by_columns = client.post("/predict", json={"columns": columns})
    assert by_rows.status_code == 200 and by_columns.status_code == 200, by_columns.text
    assert by_columns.json() == by_rows.json()
    columns["carrier"] = ["EV", "ZZ"]
    resp = client.post("/predict", json={"columns": columns})
    assert resp.status_code == 422, resp.text
    [detail] = resp.json()["detail"]
    assert detail["loc"] == ["body", "columns", "carrier", 1], detail
    assert "carrier not in the airlines table" in detail["msg"]


def test_openapi_lists_raw_fields_and_features_with_types_and_values(served, pipeline_run) -> None:
    client, _ = served
    paths = client.get("/openapi.json").json()["paths"]
    raw = paths["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    row = raw["properties"]["rows"]["items"]
    assert (
        row["properties"]["carrier"]["type"] == "string" and row["properties"]["distance"]["type"] == "number"
    )
    assert row["properties"]["time_hour"]["format"] == "date-time" and "arr_delay" not in row["properties"]
    assert {"carrier", "origin", "time_hour"} <= set(row["required"]) and "tailnum" not in row["required"]
    feats = paths["/predict/features"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    props = feats["properties"]["rows"]["items"]["properties"]
    assert set(props) == set(pipeline_run.cleaned.features)
    assert "LGA" in props["origin"]["enum"] and props["temp"]["type"] == ["number", "null"]
    by_column = feats["properties"]["columns"]["properties"]  # the same batch as one list per feature
    assert by_column["temp"]["items"] == props["temp"] and {"required": ["columns"]} in feats["oneOf"]
    assert raw["properties"]["columns"]["properties"]["carrier"]["items"]["type"] == "string"


def test_plain_requests_never_touch_pandas_on_either_route(served, pipeline_run, monkeypatch) -> None:
    """The hot path: raw rows go through the spec over numpy, feature rows straight into a float32 matrix."""
    import conveyor.tasks.inference as inference
    import conveyor.tasks.scoring as scoring

    client, _ = served
    model = load_model(pipeline_run.store, MODEL, pipeline_run.trained.version)
    features, _ = featurize_rows(featurizer_for_card(pipeline_run.store, model.card), [FLIGHT])
    expected = predict_frame(model, encode_known(features[model.features], model.categories))
    feature_row = {k: (None if v != v else v) for k, v in features[model.features].iloc[0].to_dict().items()}

    def pandas_path(*args, **kwargs):
        raise AssertionError("the pandas path served a plain request")

    monkeypatch.setattr(inference, "featurize_rows", pandas_path)
    monkeypatch.setattr(scoring, "rows_to_frame", pandas_path)
    raw = client.post("/predict", json={"rows": [FLIGHT, dict(FLIGHT, tailnum=None)]})
    feats = client.post("/predict/features", json={"rows": [feature_row]})
    assert raw.status_code == 200 and feats.status_code == 200, (raw.text, feats.text)
    assert raw.json()["probabilities"][0] == pytest.approx(float(expected[0]), abs=1e-6)
    assert feats.json()["probabilities"][0] == pytest.approx(float(expected[0]), abs=1e-6)
    by_column = client.post("/predict/features", json={"columns": {k: [v] for k, v in feature_row.items()}})
    assert by_column.status_code == 200 and by_column.json()["probabilities"] == feats.json()["probabilities"]
    rejected = client.post("/predict", json={"rows": [dict(FLIGHT, month=13)]})  # rules: the fast path too
    assert rejected.status_code == 422 and "month outside 1..12" in rejected.json()["detail"][0]["msg"]
