"""Model families and the parallel search, on the session's real-data sample and two-worker cluster."""

from __future__ import annotations

import dataclasses
import json
import posixpath
import threading

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from conveyor.store.storage import read_json
from conveyor.tasks import evaluate, search, train
from conveyor.tasks.families import ForestParams, LinearModel, LinearParams, design_matrix
from conveyor.tasks.loading import load_model
from conveyor.tasks.scoring import rows_to_frame

FAMILY_PARAMS = {
    "gbtree": train.TrainParams(num_boost_round=60, seed=3),
    "random_forest": train.TrainParams(
        family="random_forest", random_forest=ForestParams(n_trees=20, max_depth=6), seed=3
    ),
    "linear": train.TrainParams(family="linear", linear=LinearParams(max_iter=60), seed=3),
}


@pytest.fixture(scope="module")
def trained_families(pipeline_run, dask_client):
    return {
        f: train.train(pipeline_run.store, pipeline_run.cleaned, dask_client, p, model=f"fam_{f}")
        for f, p in FAMILY_PARAMS.items()
    }


@pytest.mark.parametrize("family", list(FAMILY_PARAMS))
def test_each_family_trains_and_predicts_on_real_flights(family, trained_families, pipeline_run, dask_client):
    trained = trained_families[family]
    assert trained.family == family and trained.model_file in {"model.ubj", "model.json"}
    assert 0.6 < trained.valid_auc < 0.8, (
        trained.valid_auc
    )  # learns something from real flights, but not leakage
    model = train.load_booster(pipeline_run.store, trained.model_url)
    holdout = train.load_split(
        pipeline_run.store, pipeline_run.cleaned.silver.url, train.SplitParams(), "holdout", trained.features
    ).head(500, npartitions=-1)
    p = np.asarray(model.inplace_predict(holdout[trained.features]))
    assert p.shape == (len(holdout),) and np.all((p >= 0) & (p <= 1)) and p.std() > 0.01
    result = evaluate.evaluate(pipeline_run.store, pipeline_run.cleaned, trained, dask_client)
    assert (
        result.metrics.roc_auc > result.baseline.roc_auc - 0.05
    )  # every family is at least near the baseline
    assert f"Model family: {family}" in result.report_markdown
    assert sum(result.feature_importance.values()) == pytest.approx(1.0)


def test_forest_is_one_round_of_parallel_trees(trained_families, pipeline_run):
    forest = trained_families["random_forest"]
    booster = train.load_booster(pipeline_run.store, forest.model_url)
    assert booster.num_boosted_rounds() == 1 and forest.xgb_params["num_parallel_tree"] == 20
    assert len(booster.get_dump()) == 20


def test_linear_model_is_stored_as_weights_and_served_like_a_booster(
    trained_families, pipeline_run, dask_client
):
    from conveyor.tasks import deploy

    lin = trained_families["linear"]
    body = json.loads(
        pipeline_run.store.fs.cat(pipeline_run.store.path(posixpath.join(lin.model_url, "model.json")))
    )
    model = LinearModel.from_bytes(json.dumps(body).encode())
    assert len(model.weights) == len(model.design_columns()) and model.onehot["carrier"] == len(
        lin.categories["carrier"]
    )
    evaluation = evaluate.evaluate(pipeline_run.store, pipeline_run.cleaned, lin, dask_client)
    deploy.register(pipeline_run.store, pipeline_run.cleaned, lin, evaluation)
    loaded = load_model(
        pipeline_run.store, lin.model, lin.version
    )  # the serving/scoring loader, smoke-tested
    row = dict.fromkeys(lin.features) | {"carrier": "UA", "origin": "EWR", "dest": "ORD", "dep_hour": 18}
    frame = rows_to_frame([row], loaded)
    assert 0 < float(loaded.booster.inplace_predict(frame)[0]) < 1
    assert loaded.card["family"] == "linear" and loaded.card["model_file"] == "model.json"


def test_design_matrix_one_hot_and_standardises():
    frame = pd.DataFrame({"x": [1.0, 3.0, np.nan], "c": [0.0, 2.0, np.nan]})
    m = design_matrix(frame, ["x", "c"], {"x": [2.0, 1.0]}, {"c": 3})
    assert m.tolist() == [[-1, 1, 0, 0], [1, 0, 0, 1], [0, 0, 0, 0]]  # missing: mean and no category


def test_bad_hyperparameters_fail_before_any_training():
    from conveyor.flows.params import PipelineParams

    with pytest.raises(ValidationError, match="training.model"):
        PipelineParams(training={"model": "svm"})
    with pytest.raises(ValidationError, match="training.random_forest.subsample"):
        PipelineParams(training={"model": "random_forest", "random_forest": {"subsample": 1.0}})
    with pytest.raises(ValidationError, match="training.linear.l2"):
        PipelineParams(training={"model": "linear", "linear": {"l2": -1}})
    with pytest.raises(ValidationError, match="search.budget"):
        PipelineParams(search={"budget": 0})
    with pytest.raises(ValidationError, match="search.families"):
        PipelineParams(search={"families": ["gbtree", "gbtree"]})
    with pytest.raises(ValueError, match="family must be one of"):
        train.TrainParams(family="svm")  # type: ignore[arg-type]


def test_version_hashes_only_the_chosen_family():
    base = train.TrainParams()
    assert base.identity() == dataclasses.replace(base, random_forest=ForestParams(n_trees=7)).identity()
    assert base.identity() != dataclasses.replace(base, family="random_forest").identity()


def test_candidates_are_seeded_distinct_and_start_from_each_familys_defaults():
    params = search.SearchParams(budget=7, seed=5)
    first, again = (
        search.candidates(params, train.TrainParams()),
        search.candidates(params, train.TrainParams()),
    )
    assert [c.identity() for c in first] == [c.identity() for c in again]
    assert [c.family for c in first[:3]] == ["gbtree", "random_forest", "linear"]
    assert first[0].identity() == train.TrainParams().identity()
    assert len({json.dumps(c.identity(), sort_keys=True) for c in first}) == 7
    other = search.candidates(dataclasses.replace(params, seed=6), train.TrainParams())
    assert [c.identity() for c in other[3:]] != [c.identity() for c in first[3:]]


SMALL = train.TrainParams(
    num_boost_round=40,
    random_forest=ForestParams(n_trees=10, max_depth=6),
    linear=LinearParams(max_iter=40),
    seed=3,
)


def test_search_respects_budget_and_slots_and_is_deterministic(
    pipeline_run, dask_client, monkeypatch, tmp_path
):
    from conveyor.store.maintenance import replicate

    active, peak, slots_seen = [0], [0], []
    lock = threading.Lock()
    real_fit = search.fit

    def counting_fit(client, frames, *args, workers=None, **kwargs):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            slots_seen.append(tuple(workers))
        try:
            # the candidate's data is on its slot only, and its work is restricted to that worker
            where = client.who_has(list(frames["train"].__dask_keys__()))
            assert {w for ws in where.values() for w in ws} <= set(workers)
            return real_fit(client, frames, *args, workers=workers, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(search, "fit", counting_fit)
    from distributed import get_task_stream

    params = search.SearchParams(budget=5, seed=11)
    with get_task_stream(dask_client) as stream:
        first = search.run_search(
            pipeline_run.store, pipeline_run.cleaned, dask_client, params, SMALL, model="searched"
        )
    record = first.search
    # Each tree candidate trained in one task on the slot the leaderboard names (no candidate touched
    # another slot).
    ran_on = sorted(t["worker"] for t in stream.data if str(t["key"]).startswith("_booster_on_worker"))
    assert ran_on == sorted(c["slot"] for c in record["leaderboard"] if c["family"] != "linear")
    assert len(record["leaderboard"]) == 5 and len(slots_seen) == 5  # the budget, exactly
    assert peak[0] == 2 and record["parallelism"] == 2  # two workers: two candidates at a time, never more
    assert all(len(s) == 1 for s in slots_seen)
    board = record["leaderboard"]
    assert [c["valid_auc"] for c in board] == sorted((c["valid_auc"] for c in board), reverse=True)
    assert first.version == board[0]["version"] and record["winner"] == board[0]["candidate"]
    assert first.valid_auc == pytest.approx(board[0]["valid_auc"])
    assert read_json(pipeline_run.store, record["url"])["winner_version"] == first.version

    # A rerun reuses the committed search; a fresh store trains again and finds the same winner.
    again = search.run_search(
        pipeline_run.store, pipeline_run.cleaned, dask_client, params, SMALL, model="searched"
    )
    assert again.reused and again.version == first.version and len(slots_seen) == 5
    from conveyor.store.storage import Store

    fresh = Store.from_url(tmp_path.as_uri())
    replicate(pipeline_run.store, [fresh], [f"datasets/silver_flights/{pipeline_run.cleaned.silver.version}"])
    moved = dataclasses.replace(
        pipeline_run.cleaned,
        silver=dataclasses.replace(
            pipeline_run.cleaned.silver,
            url=fresh.dataset_url("silver_flights", pipeline_run.cleaned.silver.version),
        ),
    )
    rerun = search.run_search(fresh, moved, dask_client, params, SMALL, model="searched")
    assert not rerun.reused and len(slots_seen) == 10
    assert rerun.version == first.version and rerun.search["winner"] == record["winner"]
    assert [c["candidate"] for c in rerun.search["leaderboard"]] == [c["candidate"] for c in board]
    assert [c["valid_auc"] for c in rerun.search["leaderboard"]] == pytest.approx(
        [c["valid_auc"] for c in board], abs=1e-9
    )


def test_search_with_parallelism_one_runs_candidates_one_at_a_time(pipeline_run, dask_client, monkeypatch):
    active, peak = [0], [0]
    real_fit = search.fit

    def counting_fit(*args, **kwargs):
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        try:
            return real_fit(*args, **kwargs)
        finally:
            active[0] -= 1

    monkeypatch.setattr(search, "fit", counting_fit)
    params = search.SearchParams(budget=2, families=("linear",), parallelism=1, seed=2)
    result = search.run_search(
        pipeline_run.store, pipeline_run.cleaned, dask_client, params, SMALL, model="one_slot"
    )
    assert peak[0] == 1 and result.search["parallelism"] == 1 and result.family == "linear"
    assert {c["family"] for c in result.search["leaderboard"]} == {"linear"}


def test_champion_is_scored_with_its_own_encoding(pipeline_run, dask_client):
    """The gate compares like with like: the same model as 'champion' scores exactly what it scores as
    challenger."""
    trained = pipeline_run.trained
    result = evaluate.evaluate(
        pipeline_run.store,
        pipeline_run.cleaned,
        trained,
        dask_client,
        champion_url=trained.model_url,
        champion_version="same-model-as-champion",
    )
    assert result.champion.metrics is not None
    assert result.champion.metrics.roc_auc == pytest.approx(result.metrics.roc_auc, abs=1e-12)


def test_spread_leaves_no_worker_without_training_rows(pipeline_run, dask_client):
    """A small time slice is placed on every worker (else XGBoost warns of an empty DMatrix and idles one)."""
    frame = train.load_split(
        pipeline_run.store,
        pipeline_run.cleaned.silver.url,
        train.SplitParams(),
        "valid",
        [*pipeline_run.cleaned.features, "is_late"],
    )
    spread_frame, rows = train.spread(dask_client, frame)
    assert rows == len(frame.compute())
    import xgboost as xgb

    features = pipeline_run.cleaned.features
    matrix = xgb.dask.DaskDMatrix(
        dask_client,
        spread_frame[features],
        spread_frame["is_late"],
        feature_types=train.feature_types(features),
        enable_categorical=True,
    )
    assert set(matrix.worker_map) == set(dask_client.scheduler_info(n_workers=-1)["workers"])  # nobody empty
