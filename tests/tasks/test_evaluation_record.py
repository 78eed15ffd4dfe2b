"""The committed evaluation record: what a rerun reads instead of scoring the holdout again."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from types import SimpleNamespace

import pytest

from conveyor.store.storage import Store
from conveyor.tasks import evaluation_record
from conveyor.tasks.evaluate import (
    ChampionScore,
    EvaluationResult,
    Metrics,
    MulticlassMetrics,
    RegressionMetrics,
)
from conveyor.tasks.spec import SplitParams

BINARY = Metrics(0.69, 0.49, 0.15, 0.01, 0.21, 0.7, 0.3, 0.6, 0.43, {"tn": 1, "fp": 2, "fn": 3, "tp": 4})
MULTI = MulticlassMetrics(0.6, 0.5, 0.9, [[3, 1], [2, 4]], {"a": {"precision": 0.6, "recall": 0.75}})
REGRESSION = RegressionMetrics(0.5, 0.4, 0.8)


def _result(task: str, metrics, champion: ChampionScore | None) -> EvaluationResult:
    return EvaluationResult(
        model_url="memory://store/models/m/v1",
        holdout_rows=100,
        positive_rate=0.2 if task == "binary" else float("nan"),
        metrics=metrics,
        baseline=metrics,
        baseline_name="rate per carrier",
        champion=champion,
        plots={"roc": "memory://store/models/m/v1/roc.png"},
        report_markdown="# report",
        feature_importance={"hour": 0.5},
        task=task,
        gate_metric={"binary": "roc_auc", "multiclass": "macro_f1", "regression": "rmse"}[task],
        label="late",
        classes=["a", "b"] if task == "multiclass" else [],
        label_summary={"mean": 1.0},
    )


@pytest.mark.parametrize(
    ("task", "metrics", "champion"),
    [
        ("binary", BINARY, ChampionScore("v0", BINARY, "scored on the same holdout")),
        ("binary", BINARY, ChampionScore("v0", None, "unreadable")),
        ("multiclass", MULTI, None),
        ("regression", REGRESSION, ChampionScore("v0", REGRESSION)),
    ],
)
def test_a_saved_evaluation_reads_back_equal_and_marked_reused(task, metrics, champion) -> None:
    store = Store.from_url("memory://evaluation-record")
    result = _result(task, metrics, champion)
    url = store.url("models", "m", "v1", "evaluations", f"{task}.json")
    evaluation_record.save(store, url, result)
    back = evaluation_record.load(store, url)
    assert back is not None and back.reused
    assert type(back.metrics) is type(metrics)
    mine, theirs = dataclasses.asdict(result), dataclasses.asdict(dataclasses.replace(back, reused=False))
    if task != "binary":  # NaN: checked apart (NaN != NaN)
        assert math.isnan(mine.pop("positive_rate")) and math.isnan(theirs.pop("positive_rate"))
    assert theirs == mine


def test_a_missing_or_damaged_record_is_ignored_so_the_evaluation_runs(caplog) -> None:
    store = Store.from_url("memory://evaluation-record-damaged")
    url = store.url("models", "m", "v1", "evaluations", "x.json")
    assert evaluation_record.load(store, url) is None
    for damage in (b"{not json", json.dumps({"format": 99}).encode(), json.dumps({"format": 1}).encode()):
        with store.fs.open(store.path(url), "wb") as fh:
            fh.write(damage)
        with caplog.at_level(logging.WARNING):
            assert evaluation_record.load(store, url) is None
    assert "evaluating again" in caplog.text


def test_the_record_is_keyed_by_everything_the_evaluation_read() -> None:
    cleaned = SimpleNamespace(silver=SimpleNamespace(version="s1"))
    trained = SimpleNamespace(version="v1", model_url="memory://store/models/m/v1")
    split = SplitParams()
    url = evaluation_record.record_url(cleaned, trained, split, None)
    assert url.startswith("memory://store/models/m/v1/evaluations/")
    # The model compared with itself (a rerun after its promotion) is the run with no champion.
    assert evaluation_record.record_url(cleaned, trained, split, "v1") == url
    others = {
        evaluation_record.record_url(cleaned, trained, split, "v0"),
        evaluation_record.record_url(
            SimpleNamespace(silver=SimpleNamespace(version="s2")), trained, split, None
        ),
        evaluation_record.record_url(
            cleaned, SimpleNamespace(version="v2", model_url=trained.model_url), split, None
        ),
        evaluation_record.record_url(
            cleaned, trained, dataclasses.replace(split, train_end="2013-08-01"), None
        ),
    }
    assert url not in others and len(others) == 4
