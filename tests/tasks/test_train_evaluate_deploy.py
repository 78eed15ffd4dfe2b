"""Train, evaluate and the deploy gate on a sample of the real flights."""

from __future__ import annotations

import dataclasses
import json
import posixpath

import numpy as np
import pytest
import xgboost as xgb

from conveyor.store.storage import read_json
from conveyor.tasks import deploy, train
from conveyor.tasks.deploy import CHAMPION, GateParams, get_alias, set_alias
from conveyor.tasks.evaluate import Metrics, best_f1_threshold, calibration_error, score
from tests.support import file_stamps, fresh_store


def test_model_beats_the_naive_baseline_on_the_time_holdout(pipeline_run) -> None:
    evaluation = pipeline_run.evaluation
    assert evaluation.holdout_rows > 5_000
    assert evaluation.metrics.roc_auc > evaluation.baseline.roc_auc + 0.01
    assert evaluation.metrics.log_loss < evaluation.baseline.log_loss
    assert "baseline" in evaluation.report_markdown.lower()


def test_time_split_trains_on_earlier_months(pipeline_run) -> None:
    trained = pipeline_run.trained
    info = read_json(pipeline_run.store, posixpath.join(trained.model_url, "train.json"))
    assert trained.train_rows > trained.valid_rows > 0
    assert info["split"]["train_end"] < info["split"]["valid_end"]
    assert trained.best_iteration + 1 < 200  # early stopping on the validation month chose the rounds


def test_model_is_saved_as_ubj_never_pickle(pipeline_run) -> None:
    store, trained = pipeline_run.store, pipeline_run.trained
    files = store.fs.ls(store.path(trained.model_url), detail=False)
    names = {posixpath.basename(f) for f in files}
    assert "model.ubj" in names
    assert not any(n.endswith((".pkl", ".pickle", ".joblib")) for n in names)
    booster = train.load_booster(store, trained.model_url)
    assert isinstance(booster, xgb.Booster)
    assert booster.feature_names == trained.features


def test_rerun_of_train_reuses_the_committed_model(pipeline_run, dask_client) -> None:
    store, trained = pipeline_run.store, pipeline_run.trained
    before = file_stamps(store.path(trained.model_url))
    again = train.train(store, pipeline_run.cleaned, dask_client, train.TrainParams(num_boost_round=200))
    assert again.version == trained.version and again.model_url == trained.model_url
    assert again.reused and not trained.reused
    # Nothing was trained or written again: the same files, never rewritten, none added.
    assert file_stamps(store.path(trained.model_url)) == before


def test_first_model_is_registered_and_promoted(pipeline_run) -> None:
    deployed = pipeline_run.deployed
    assert deployed.promoted and deployed.champion_before is None
    card = read_json(pipeline_run.store, deployed.card_url)
    assert card["version"] == deployed.version
    assert card["metrics"]["roc_auc"] == pytest.approx(pipeline_run.evaluation.metrics.roc_auc)
    assert card["datasets"]["silver"] == pipeline_run.cleaned.silver.version
    pointer = get_alias(pipeline_run.store, deployed.model)
    assert pointer["version"] == deployed.version


def _with_champion(evaluation, champion_auc: float):
    champ_metrics = dataclasses.replace(evaluation.metrics, roc_auc=champion_auc)
    from conveyor.tasks.evaluate import ChampionScore

    return dataclasses.replace(evaluation, champion=ChampionScore(version="older", metrics=champ_metrics))


def test_gate_refuses_a_worse_challenger_and_says_why(pipeline_run) -> None:
    evaluation = _with_champion(pipeline_run.evaluation, pipeline_run.evaluation.metrics.roc_auc + 0.05)
    ok, why = deploy.gate(evaluation, GateParams(tolerance=0.01))
    assert not ok
    assert "champion older" in why and "<" in why


def test_gate_accepts_within_tolerance(pipeline_run) -> None:
    evaluation = _with_champion(pipeline_run.evaluation, pipeline_run.evaluation.metrics.roc_auc + 0.005)
    assert deploy.gate(evaluation, GateParams(tolerance=0.01))[0]
    assert not deploy.gate(evaluation, GateParams(tolerance=0.0))[0]


def test_gate_refuses_a_model_no_better_than_the_baseline(pipeline_run) -> None:
    worse = dataclasses.replace(
        pipeline_run.evaluation.metrics, roc_auc=pipeline_run.evaluation.baseline.roc_auc
    )
    ok, why = deploy.gate(dataclasses.replace(pipeline_run.evaluation, metrics=worse), GateParams())
    assert not ok and "baseline" in why


def test_alias_swap_keeps_history(tmp_path, pipeline_run) -> None:
    deployed = pipeline_run.deployed
    # A copy of the registered version: no test moves an alias of the session's shared store.
    store = fresh_store(tmp_path / "store", pipeline_run, deployed.version)
    before = get_alias(store, deployed.model)
    set_alias(store, deployed.model, "challenger", deployed.version, "unit test")
    history = store.fs.glob(
        store.path(store.url("models", deployed.model, "aliases", "history", "challenger", "*.json"))
    )
    assert len(history) >= 1
    assert get_alias(store, deployed.model) == before  # another alias untouched
    with pytest.raises(ValueError, match="not registered"):
        set_alias(store, deployed.model, CHAMPION, "0000000000000000", "bogus")


def test_metrics_helpers_on_known_values() -> None:
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8])
    m = score(y, p, threshold=0.3)
    assert isinstance(m, Metrics)
    assert m.roc_auc == pytest.approx(0.75)
    assert m.confusion == {"tn": 1, "fp": 1, "fn": 0, "tp": 2}
    assert calibration_error(np.array([0, 1]), np.array([0.0, 1.0])) == pytest.approx(0.0)
    assert 0.1 <= best_f1_threshold(y, p) <= 0.8
    json.dumps(dataclasses.asdict(m))  # reports and cards serialise metrics as JSON


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 1.01])  # 1.01: nothing predicted positive
def test_label_metrics_are_scikit_learns(threshold: float) -> None:
    from sklearn import metrics as skm

    rng = np.random.default_rng(7)
    y = (rng.random(5_000) < 0.3).astype(int)
    p = np.clip(0.25 * y + 0.75 * rng.random(5_000), 0, 1)
    m = score(y, p, threshold)
    pred = (np.clip(p, 1e-7, 1 - 1e-7) >= threshold).astype(int)
    assert m.accuracy == pytest.approx(skm.accuracy_score(y, pred), abs=1e-12)
    assert m.precision == pytest.approx(skm.precision_score(y, pred, zero_division=0), abs=1e-12)
    assert m.recall == pytest.approx(skm.recall_score(y, pred, zero_division=0), abs=1e-12)
    assert m.f1 == pytest.approx(skm.f1_score(y, pred, zero_division=0), abs=1e-12)
    assert m.brier == pytest.approx(skm.brier_score_loss(y, np.clip(p, 1e-7, 1 - 1e-7)), abs=1e-12)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()
    assert m.confusion == {"tn": tn, "fp": fp, "fn": fn, "tp": tp}
