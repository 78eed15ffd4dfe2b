"""Champion poisoning: the gate also judges on the operator's pinned reference holdout."""

from __future__ import annotations

import dataclasses

import pytest

from conveyor.flows.training import _deploy
from conveyor.store.maintenance import Version, copy_version
from conveyor.store.registry import read_alias
from conveyor.tasks import reference
from conveyor.tasks.deploy import GateParams, decide
from conveyor.tasks.reference import ENV, ReferenceError, ReferenceScores, pinned, score_reference
from tests.support import MODEL, fresh_store, variant


def test_the_operator_pins_one_dataset_version_per_model(monkeypatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert pinned(MODEL) is None
    monkeypatch.setenv(ENV, '{"flights_late": "silver_flights/abc123"}')
    assert pinned(MODEL) == "silver_flights/abc123" and pinned("other") is None
    for bad in ("silver_flights/abc", '{"flights_late": "a/b/c"}', '{"flights_late": "../x"}', "[1]"):
        monkeypatch.setenv(ENV, bad)
        with pytest.raises(ReferenceError, match=ENV):
            pinned(MODEL)


def test_a_challenger_worse_on_the_reference_is_refused_even_when_its_own_holdout_says_otherwise(
    pipeline_run, dask_client
) -> None:
    weak, weak_eval = variant(pipeline_run, dask_client, "weak")
    champion = pipeline_run.trained
    # What a poisoned holdout reports: the weak model far ahead of the champion.
    poisoned = dataclasses.replace(
        weak_eval, metrics=dataclasses.replace(weak_eval.metrics, roc_auc=0.99, f1=0.99)
    )
    params = GateParams(guards={})
    assert decide(poisoned, params).promote  # the run's own holdout alone would promote it

    ref = f"{pipeline_run.cleaned.silver.name}/{pipeline_run.cleaned.silver.version}"
    scores = score_reference(pipeline_run.store, ref, "roc_auc", weak.model_url, champion.model_url)
    assert scores.rows > 0 and scores.challenger < scores.champion, scores
    decision = decide(poisoned, params, scores)
    assert not decision.promote and "reference holdout" in decision.reason
    fair = score_reference(pipeline_run.store, ref, "roc_auc", champion.model_url, champion.model_url)
    assert decide(poisoned, params, fair).promote  # no worse there: the reference does not block it


def test_an_unreadable_reference_refuses_every_promotion(pipeline_run, dask_client) -> None:
    weak, weak_eval = variant(pipeline_run, dask_client, "weak")
    scores = score_reference(
        pipeline_run.store, "silver_flights/0000000000000000", "roc_auc", weak.model_url, weak.model_url
    )
    assert scores.challenger is None and "unreadable" in scores.note
    better = dataclasses.replace(weak_eval, metrics=dataclasses.replace(weak_eval.metrics, roc_auc=0.99))
    decision = decide(better, GateParams(guards={}), scores)
    assert not decision.promote and "unreadable" in decision.reason
    missing = ReferenceScores("d/v", "roc_auc", 10, 0.7, None, "the champion could not be scored")
    assert not decide(better, GateParams(guards={}), missing).promote


def test_the_flow_deploy_applies_the_pinned_reference(
    pipeline_run, dask_client, tmp_path, monkeypatch
) -> None:
    weak, weak_eval = variant(pipeline_run, dask_client, "weak")
    champion = pipeline_run.trained
    store = fresh_store(tmp_path / "store", pipeline_run, champion.version, weak.version)
    silver = pipeline_run.cleaned.silver
    copy_version(pipeline_run.store, store, Version("datasets", silver.name, silver.version))
    poisoned = dataclasses.replace(
        weak_eval, metrics=dataclasses.replace(weak_eval.metrics, roc_auc=0.99, f1=0.99)
    )
    monkeypatch.setenv(ENV, f'{{"{MODEL}": "{silver.name}/{silver.version}"}}')
    result = _deploy(store, pipeline_run.cleaned, weak, poisoned, GateParams(guards={}))
    assert not result.promoted and "reference holdout" in result.reason
    assert read_alias(store, MODEL).version == champion.version
    assert any(c.name == "reference" and not c.passed for c in result.checks)

    monkeypatch.delenv(ENV)  # the same run without a pinned reference: the poisoned holdout wins
    result = _deploy(store, pipeline_run.cleaned, weak, poisoned, GateParams(guards={}))
    assert result.promoted and read_alias(store, MODEL).version == weak.version
    assert reference.pinned(MODEL) is None
