"""Bounded memory at scale: trees from external memory, the holdout and the data profile read part by part."""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from conveyor.store.storage import open_manifest, part_urls, read_dataset
from conveyor.tasks import evaluate, monitor, train


@contextmanager
def nothing_persisted_or_gathered_whole(monkeypatch):
    """Fail on any persist of a dask frame, and on computing a whole frame into this process: what a
    stage that reads its data part by part never needs."""
    import dask.dataframe as dd

    def refuse(self, *args, **kwargs):
        raise AssertionError("a whole dask frame was persisted or computed")

    with monkeypatch.context() as patch:
        patch.setattr(dd.DataFrame, "persist", refuse)
        patch.setattr(dd.DataFrame, "compute", refuse)
        yield


def test_the_engine_is_chosen_by_silver_rows() -> None:
    params = train.TrainParams(external_memory_rows=1_000)
    assert params.engine(1_000) == "dask" and params.engine(1_001) == "external_memory"
    assert dataclasses.replace(params, family="linear").engine(10**9) == "dask"  # linear has no such path
    assert train.TrainParams().engine(327_346) == "dask"  # the flagship data trains in memory
    assert "external_memory_rows" not in train.TrainParams().identity()  # how, not what: same version


def test_the_operator_bounds_the_rows_a_run_form_may_put_in_worker_memory(monkeypatch) -> None:
    asks_for_more = train.TrainParams(external_memory_rows=10**12)  # a form value past the machines
    assert asks_for_more.engine(30_000_000) == "external_memory"  # the default bound: 20M rows
    monkeypatch.setenv("CONVEYOR_MAX_IN_MEMORY_ROWS", "1000")
    assert asks_for_more.engine(1_001) == "external_memory" and asks_for_more.engine(1_000) == "dask"
    assert train.TrainParams(external_memory_rows=10).engine(11) == "external_memory"  # less: allowed


def test_silver_batches_are_the_encoded_slice(pipeline_run, tmp_path) -> None:
    store, cleaned = pipeline_run.store, pipeline_run.cleaned
    url, schema = cleaned.silver.url, cleaned.schema
    parts = part_urls(store, url, open_manifest(store, url))
    columns = [*schema.features, schema.label]
    expected = train.load_split(store, url, None, "valid", columns).compute().reset_index(drop=True)
    batches = train.SilverBatches(
        store,
        parts,
        schema.split_params(),
        "valid",
        list(schema.features),
        schema.label,
        schema.categories,
        str(tmp_path / "cache"),
        batch_rows=1_000,
    )
    seen: list[pd.DataFrame] = []

    def take(data, label, feature_types):
        assert feature_types == train.feature_types(schema.features, schema.categories)
        seen.append(data.assign(**{schema.label: label}))

    while batches.next(take):
        pass
    batches.reset()
    assert len(seen) > 1 and max(len(s) for s in seen) <= 1_000
    got = pd.concat(seen).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, expected[got.columns])
    assert batches.rows == len(expected) > 0


def test_external_memory_training_matches_the_in_memory_model(pipeline_run, dask_client) -> None:
    """Without row or column sampling (the engines draw them differently), over the rounds both kept,
    the two engines differ only by their quantile sketches: nearly the same predictions."""
    store, cleaned = pipeline_run.store, pipeline_run.cleaned
    same = {"num_boost_round": 30, "early_stopping_rounds": 1_000, "subsample": 1.0, "colsample_bytree": 1.0}
    trained = {
        engine: train.train(
            store,
            cleaned,
            dask_client,
            train.TrainParams(**same, external_memory_rows=threshold),  # 0 forces it on small data
            model=f"engine_check_{engine}",
        )
        for engine, threshold in (("dask", 10**9), ("external_memory", 0))
    }
    in_memory, external = trained["dask"], trained["external_memory"]
    assert (in_memory.engine, external.engine) == ("dask", "external_memory")
    assert external.version == in_memory.version  # the engine is not part of what the model is
    assert (external.train_rows, external.valid_rows) == (in_memory.train_rows, in_memory.valid_rows)
    rounds = min(external.best_iteration, in_memory.best_iteration) + 1  # each kept its best round
    assert rounds > 5

    holdout = train.load_split(
        store, cleaned.silver.url, None, "holdout", [*in_memory.features, in_memory.label]
    ).compute()
    x, y = holdout[in_memory.features], holdout[in_memory.label].to_numpy()
    p_mem = train.load_booster(store, in_memory.model_url)[:rounds].inplace_predict(x)
    p_ext = train.load_booster(store, external.model_url)[:rounds].inplace_predict(x)
    assert np.corrcoef(p_mem, p_ext)[0, 1] > 0.99
    assert np.mean(np.abs(p_mem - p_ext)) < 0.01
    assert abs(roc_auc_score(y, p_ext) - roc_auc_score(y, p_mem)) < 0.005


def test_evaluation_part_by_part_equals_the_evaluation_in_one_piece(pipeline_run) -> None:
    store, cleaned, trained, evaluation = (
        pipeline_run.store,
        pipeline_run.cleaned,
        pipeline_run.trained,
        pipeline_run.evaluation,
    )
    url, schema, target = cleaned.silver.url, cleaned.schema, trained.target
    keys, label, features = list(schema.baseline_keys), target.label, trained.features
    cols = list(dict.fromkeys([*features, *keys, label]))
    lazy = train.load_split(store, url, None, "holdout", cols)
    assert lazy.npartitions > 1  # the evaluation read it in several pieces
    holdout = lazy.compute()
    valid = train.load_split(store, url, None, "valid", cols).compute()
    booster = train.load_booster(store, trained.model_url)
    base = evaluate.fit_baseline(
        train.load_split(store, url, None, "train", [*keys, label]), target, keys, trained.categories
    )

    def one_piece(predict):
        return evaluate.score_target(
            target,
            holdout[label].to_numpy(dtype=int),
            predict(holdout),
            valid[label].to_numpy(dtype=int),
            predict(valid),
        )

    model = one_piece(lambda f: booster.inplace_predict(f[features]).astype("float64"))
    baseline = one_piece(lambda f: evaluate.baseline_predict(base, f[keys]))
    assert evaluation.holdout_rows == len(holdout)
    for got, want in ((evaluation.metrics, model), (evaluation.baseline, baseline)):
        assert got.confusion == want.confusion
        scores = {k: v for k, v in dataclasses.asdict(want).items() if k != "confusion"}
        assert {k: getattr(got, k) for k in scores} == pytest.approx(scores, abs=1e-12)


def test_evaluation_never_holds_a_whole_slice(pipeline_run, dask_client, monkeypatch) -> None:
    """Each partition is reduced to the label and the predictions where it is read: no raw slice is
    persisted on the workers or brought whole into this process."""
    store, cleaned, trained = pipeline_run.store, pipeline_run.cleaned, pipeline_run.trained
    with nothing_persisted_or_gathered_whole(monkeypatch):
        again = evaluate.evaluate(store, cleaned, trained, dask_client)
    assert again.metrics == pipeline_run.evaluation.metrics


def test_profile_part_by_part_equals_the_profile_of_the_whole_frame(pipeline_run, monkeypatch) -> None:
    store, cleaned = pipeline_run.store, pipeline_run.cleaned
    url, version = cleaned.silver.url, cleaned.silver.version
    columns = [*cleaned.schema.features, cleaned.schema.label]
    whole = monitor.profile_frame(
        read_dataset(store, url, columns=columns).compute(), "silver", version, 100, 3, columns
    )
    with nothing_persisted_or_gathered_whole(monkeypatch):
        parts = monitor.profile_dataset(store, url, "silver", version, 100, 3, columns)
    assert (parts.rows, parts.rows_in, parts.quarantined) == (whole.rows, 100, 3)
    for col in columns:
        got, want = parts.columns[col], whole.columns[col]
        assert (got.kind, got.edges) == (want.kind, want.edges), col
        assert got.null_rate == pytest.approx(want.null_rate, abs=1e-12), col
        assert got.shares == pytest.approx(want.shares, abs=1e-12), col
        assert got.categories == pytest.approx(want.categories, abs=1e-12), col


def test_profile_edges_of_big_data_come_from_a_seeded_sample(pipeline_run, monkeypatch) -> None:
    store, cleaned = pipeline_run.store, pipeline_run.cleaned
    url, version = cleaned.silver.url, cleaned.silver.version
    columns = list(cleaned.schema.features)
    exact = monitor.profile_dataset(store, url, "silver", version, 0, 0, columns)
    monkeypatch.setattr(monitor, "EDGE_SAMPLE_ROWS", 5_000)
    sampled = monitor.profile_dataset(store, url, "silver", version, 0, 0, columns)
    assert sampled == monitor.profile_dataset(store, url, "silver", version, 0, 0, columns)  # seeded
    numeric = [c for c in columns if exact.columns[c].kind == "numeric"]
    assert numeric and any(sampled.columns[c].edges != exact.columns[c].edges for c in numeric)
    # Only the edges come from the sample: every row is counted into them.
    frame = read_dataset(store, url, columns=columns).compute()
    counted = monitor.profile_frame(frame, "silver", version, 0, 0, columns, reference=sampled)
    for col in numeric:
        assert sampled.columns[col].shares == pytest.approx(counted.columns[col].shares, abs=1e-12), col
        assert sampled.columns[col].null_rate == pytest.approx(exact.columns[col].null_rate, abs=1e-12)
