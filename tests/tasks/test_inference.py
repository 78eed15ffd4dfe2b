"""One feature definition: raw rows scored online, in batch and on the evaluation path agree to 1e-6."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conveyor.store.registry import CHAMPION, read_alias
from conveyor.store.storage import Store, open_manifest, read_dataset, read_dataset_pandas
from conveyor.tasks import clean, deploy, evaluate, ingest, train
from conveyor.tasks.inference import FastEncoder, featurize_rows, featurizer_for_card, score_raw
from conveyor.tasks.loading import load_model
from conveyor.tasks.scoring import PREDICTION, PROBABILITY, encode_known, predict_frame, predict_matrix
from conveyor.tasks.spec import load_spec
from tests.support import FLIGHT

SAMPLE = 300


def _evaluation_path(store: Store, client, model, keys: list[str]) -> pd.DataFrame:
    """Holdout rows as evaluate scores them: the silver slice, encoded, predicted by the booster on Dask."""
    silver_url = model.card["datasets"]["silver_url"]
    schema = train.silver_schema(store, silver_url)
    columns = list(dict.fromkeys([*keys, *model.features]))
    holdout = (
        train.load_split(store, silver_url, schema.split_params(), "holdout", columns, encode=False)
        .compute()
        .head(SAMPLE)
    )
    encoded = train.categorize(holdout[model.features], model.categories, model.features)
    holdout["evaluated"] = np.asarray(model.booster.inplace_predict(encoded), dtype="float64").reshape(
        len(holdout), -1
    )[:, -1]
    return holdout


def _raw_rows(
    store: Store, bronze_url: str, holdout: pd.DataFrame, keys: list[str], leaky: set[str]
) -> pd.DataFrame:
    """The bronze (typed, unlabelled) rows behind the holdout rows, as text: what a user would send."""
    bronze = read_dataset_pandas(store, bronze_url)
    wanted = holdout[keys].drop_duplicates()
    wanted = wanted.astype({k: bronze[k].dtype for k in keys if wanted[k].dtype != bronze[k].dtype})
    rows = bronze.merge(wanted, on=keys, how="inner").drop(columns=[c for c in leaky if c in bronze.columns])
    return rows.astype("string")


def _check_three_paths(tmp_path: Path, store: Store, client, model_name: str, keys: list[str]) -> dict:
    model = load_model(store, model_name, read_alias(store, model_name, CHAMPION).version)
    featurizer = featurizer_for_card(store, model.card)
    holdout = _evaluation_path(store, client, model, keys)
    main = featurizer.loaded.spec.main
    lineage = open_manifest(store, model.card["datasets"]["silver_url"]).lineage
    bronze_url = store.dataset_url(f"bronze_{main}", lineage["bronze"][main])
    leaky = set(featurizer.loaded.label_columns) | set(featurizer.loaded.spec.features.forbidden)
    raw = _raw_rows(store, bronze_url, holdout, keys, leaky)
    assert len(raw) >= SAMPLE * 0.9

    # online: request rows (JSON-like dicts) -> features -> booster
    records = [{k: (None if pd.isna(v) else v) for k, v in row.items()} for row in raw.to_dict("records")]
    features, problems = featurize_rows(featurizer, records)
    assert problems == []
    online = raw[keys].copy()
    online["online"] = predict_frame(model, encode_known(features[model.features], model.categories)).reshape(
        len(raw), -1
    )[:, -1]
    # served: what POST /predict computes (the spec over numpy arrays), unless it declines these rows
    fast = FastEncoder(featurizer, model.features, model.categories).encode(records)
    if fast is not None:
        matrix, fast_problems = fast
        assert fast_problems == []
        online["served"] = predict_matrix(model, matrix).reshape(len(raw), -1)[:, -1]

    # batch: the same rows as a CSV file through score_raw on the cluster
    source = tmp_path / f"{featurizer.loaded.spec.main}.csv"
    raw.to_csv(source, index=False)
    result = score_raw(store, client, str(source), model_name, output_name=f"skew_{model_name}")
    assert result.quarantined == 0 and result.rows == len(raw)
    batch = read_dataset(store, result.predictions.url).compute()
    value = PROBABILITY if PROBABILITY in batch.columns else PREDICTION
    batch = batch[[*keys, value]].rename(columns={value: "batch"})

    merged = holdout[[*keys, "evaluated"]]
    for frame in (online, batch):
        frame = frame.astype({k: merged[k].dtype for k in keys})
        merged = merged.merge(frame, on=keys, how="inner")
    assert len(merged) >= SAMPLE * 0.9
    paths = ["online", "batch"] + (["served"] if fast is not None else [])
    gaps = {p: float(np.abs(merged[p] - merged["evaluated"]).max()) for p in paths}
    assert all(gap <= 1e-6 for gap in gaps.values()), gaps
    return gaps | {"rows": len(merged), "served_fast_path": fast is not None}


def test_flights_raw_online_batch_and_evaluation_agree(tmp_path, pipeline_run, dask_client) -> None:
    keys = load_spec("flights").spec.row_keys
    gaps = _check_three_paths(tmp_path, pipeline_run.store, dask_client, pipeline_run.trained.model, keys)
    assert gaps["served_fast_path"], "the serving fast path declined plain flights"
    print(gaps)


@pytest.fixture(scope="module")
def county_run(tmp_path_factory, dask_client):
    loaded = load_spec("county_murders")
    store = Store.from_url(tmp_path_factory.mktemp("county").as_uri())
    ingested = ingest.ingest(store, dask_client, loaded=loaded)
    cleaned = clean.clean(store, ingested, dask_client, loaded)
    trained = train.train(
        store, cleaned, dask_client, train.TrainParams(num_boost_round=60), model="county_murders"
    )
    evaluation = evaluate.evaluate(store, cleaned, trained, dask_client)
    deployed = deploy.deploy(store, cleaned, trained, evaluation)
    return store, cleaned, evaluation, deployed


def test_county_murders_second_spec_runs_and_beats_its_baseline(county_run) -> None:
    _, cleaned, evaluation, deployed = county_run
    assert cleaned.schema.task == "regression" and cleaned.silver.rows == 37_349
    assert evaluation.metrics.rmse < 0.7 * evaluation.baseline.rmse  # measured: 0.50 vs 1.00
    assert deployed.promoted


def test_county_murders_raw_online_batch_and_evaluation_agree(tmp_path, county_run, dask_client) -> None:
    store = county_run[0]
    print(_check_three_paths(tmp_path, store, dask_client, "county_murders", ["countyid", "year"]))


def test_unlabelled_rows_skip_label_rules_but_not_the_others(pipeline_run) -> None:
    model = load_model(pipeline_run.store, pipeline_run.trained.model, pipeline_run.trained.version)
    featurizer = featurizer_for_card(pipeline_run.store, model.card)
    row = dict(FLIGHT)
    features, problems = featurize_rows(featurizer, [row])  # no arr_delay: the label rule is skipped
    assert problems == [] and features["temp"].notna().all() and features["plane_age"].notna().all()
    _, problems = featurize_rows(featurizer, [dict(row, month=13), dict(row, carrier="ZZ"), row])
    assert [(p.row, p.field) for p in problems] == [(0, "month"), (1, "carrier")]
    assert "month outside 1..12" in problems[0].msg and "airlines" in problems[1].msg
    _, problems = featurize_rows(featurizer, [dict(row, arr_delay=20), dict(row, dest=None)])
    assert [(p.row, p.field) for p in problems] == [(0, "arr_delay"), (1, "dest")]
    assert "unknown field 'arr_delay'" in problems[0].msg and "'dest' is required" in problems[1].msg


def test_batch_scoring_keeps_its_quarantine_reasons_in_the_manifest(
    tmp_path, pipeline_run, dask_client, monkeypatch
) -> None:
    """Counted in the scoring pass and kept with the quarantine, as clean does: scoring the same input
    again reads the counts, not the quarantined rows."""
    store = pipeline_run.store
    loaded = load_spec("flights")
    leaky = set(loaded.label_columns) | set(loaded.spec.features.forbidden)
    raw = read_dataset_pandas(store, pipeline_run.ingested.tables["flights"].bronze.url).head(40)
    raw = raw.drop(columns=[c for c in leaky if c in raw.columns]).astype("string")
    raw.loc[raw.index[0], "month"] = "13"
    raw.loc[raw.index[1], "carrier"] = "ZZ"
    source = tmp_path / "flights.csv"
    raw.to_csv(source, index=False)
    model = pipeline_run.trained.model

    first = score_raw(store, dask_client, str(source), model, output_name="reasons_kept")
    assert first.quarantined == 2 and sum(first.quarantine_reasons.values()) == 2
    kept = open_manifest(store, first.quarantine_url).extra[clean.REASONS_KEY]
    assert kept == first.quarantine_reasons

    def no_rows(*args, **kwargs):
        raise AssertionError("read the quarantined rows of a committed scoring")

    monkeypatch.setattr(clean, "read_dataset", no_rows)
    again = score_raw(store, dask_client, str(source), model, output_name="reasons_kept")
    assert again.reused and again.quarantine_reasons == first.quarantine_reasons
