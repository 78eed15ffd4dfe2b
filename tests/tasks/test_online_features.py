"""The serving fast path computes exactly the Featurizer's features and reasons, or declines.

``FastEncoder`` evaluates the spec over numpy arrays for small requests; the pandas Featurizer
(``featurize_rows``) is the reference. Every comparison here is exact (float32 bits, NaN where
NaN), on real bronze rows, on rows that must be quarantined, and on generated rows.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conveyor.store.storage import open_manifest, read_dataset_pandas
from conveyor.tasks.inference import FastEncoder, featurize_rows, featurizer_for_card, request_problems
from conveyor.tasks.loading import load_model
from conveyor.tasks.scoring import encode_known
from tests.support import FLIGHT


class _Online(tuple):
    """(model, featurizer, fast encoder); a short repr for hypothesis' reports."""

    def __repr__(self) -> str:
        return "<online model>"


@pytest.fixture(scope="module")
def online(pipeline_run):
    model = load_model(pipeline_run.store, pipeline_run.trained.model, pipeline_run.trained.version)
    featurizer = featurizer_for_card(pipeline_run.store, model.card)
    return _Online((model, featurizer, FastEncoder(featurizer, model.features, model.categories)))


def _reference(model, featurizer, rows):
    """What the pandas path gives: the encoded matrix and the problems, as comparable values."""
    features, problems = featurize_rows(featurizer, rows)
    matrix = encode_known(features[model.features], model.categories)[model.features].to_numpy("float32")
    return matrix, [(p.row, p.field, p.msg) for p in problems]


def _assert_same(online, rows) -> None:
    model, featurizer, encoder = online
    assert request_problems(featurizer, rows) == []
    fast = encoder.encode(rows)
    assert fast is not None, "the fast path declined rows it should decide"
    matrix, problems = fast
    expected, expected_problems = _reference(model, featurizer, rows)
    assert [(p.row, p.field, p.msg) for p in problems] == expected_problems
    assert matrix.dtype == np.float32 and matrix.shape == expected.shape
    np.testing.assert_array_equal(matrix, expected)  # NaN where NaN, every other value to the bit


def _bronze_records(pipeline_run, featurizer, n: int, as_text: bool) -> list[dict]:
    """Rows of the bronze flights the model was trained from, as a client sends them (JSON values)."""
    store, main = pipeline_run.store, featurizer.loaded.spec.main
    lineage = open_manifest(store, pipeline_run.cleaned.silver.url).lineage
    bronze = read_dataset_pandas(
        store, store.dataset_url(f"bronze_{main}", lineage["bronze"][main]), featurizer.raw_schema.names
    ).head(n)
    if as_text:  # what the skew test and CSV-minded clients send: every value a string
        bronze = bronze.astype("string")
        return [{k: (None if pd.isna(v) else v) for k, v in r.items()} for r in bronze.to_dict("records")]
    return [
        {k: (None if v is None else v) for k, v in r.items()}
        for r in pd.io.json.ujson_loads(bronze.to_json(orient="records", date_format="iso", date_unit="s"))
    ]


@pytest.mark.parametrize("as_text", [False, True])
def test_fast_path_equals_the_featurizer_on_bronze_rows(online, pipeline_run, as_text) -> None:
    rows = _bronze_records(pipeline_run, online[1], 600, as_text)
    assert not online[2].problem
    _assert_same(online, rows)  # one batch
    for row in rows[:25]:  # and single rows, the serving shape
        _assert_same(online, [row])


QUARANTINED = [
    dict(FLIGHT, month=13),
    dict(FLIGHT, carrier="ZZ"),
    dict(FLIGHT, dest="abcd"),
    dict(FLIGHT, dest="MSNX"),  # the pattern must match the whole value
    dict(FLIGHT, distance=0),
    dict(FLIGHT, sched_dep_time=1377),
    dict(FLIGHT, sched_arr_time=2500),
    dict(FLIGHT, hour=24, minute=60),  # two rules broken: the first in the spec's order is the reason
    dict(FLIGHT, origin="XXX"),
]
ODD_BUT_VALID = [
    dict(FLIGHT, month=2, day=30),  # passes the rules, no such date: day_of_week/day_of_year missing
    dict(FLIGHT, tailnum=None, flight=None),  # no plane: plane columns missing
    dict(FLIGHT, tailnum="N00000"),  # not in planes
    dict(FLIGHT, carrier="DL", dest="ZZZ"),  # a destination unseen in training: scored as missing
    dict(FLIGHT, time_hour="2013-11-05 18:00:00"),  # no zone: UTC
    dict(FLIGHT, time_hour="2012-01-01T00:00:00+00:00"),  # no weather that hour
    dict(FLIGHT, distance=812.5, year="2013", sched_dep_time="1350"),
]


def test_quarantined_rows_get_the_same_reasons_one_by_one_and_together(online) -> None:
    for row in QUARANTINED + ODD_BUT_VALID:
        _assert_same(online, [row])
    _assert_same(online, QUARANTINED + ODD_BUT_VALID + [FLIGHT])
    _, problems = online[2].encode(QUARANTINED)
    assert len(problems) == len(QUARANTINED)
    assert problems[0].field == "month" and "month outside 1..12" in problems[0].msg
    assert problems[1].field == "carrier" and "airlines" in problems[1].msg


@pytest.mark.parametrize(
    "row",
    [
        dict(FLIGHT, origin=" LGA"),  # ingest strips text: its rules, not ours
        dict(FLIGHT, tailnum="NA"),  # a spelling of "no value"
        dict(FLIGHT, distance="8.12e2"),  # a number format parsers may read differently
        dict(FLIGHT, time_hour="2013-11-05T18:00:00+05:00"),  # a zone offset
        dict(FLIGHT, year=2013.0),  # a float for an int field
        dict(FLIGHT, distance="far"),  # does not parse: the Featurizer words the reason
        dict(FLIGHT, month=True),
    ],
)
def test_the_fast_path_declines_what_the_featurizer_must_decide(online, row) -> None:
    assert online[2].encode([row]) is None
    assert online[2].encode([FLIGHT, row]) is None  # one such row sends the whole request


raw_values = {
    "year": st.sampled_from([2013, 2012, "2013", None]),
    "month": st.integers(-1, 14),
    "day": st.integers(0, 32),
    "sched_dep_time": st.integers(-5, 2500),
    "sched_arr_time": st.integers(0, 2460) | st.sampled_from(["1531", "0007"]),
    "carrier": st.sampled_from(["EV", "DL", "UA", "ZZ", "9E"]),
    "flight": st.none() | st.integers(1, 9999),
    "tailnum": st.none() | st.sampled_from(["N614QX", "N14228", "N00000", "x"]),
    "origin": st.sampled_from(["LGA", "JFK", "EWR", "XXX"]),
    "dest": st.sampled_from(["MSN", "ATL", "abc", "ZZZ", "LAXX"]),
    "distance": st.floats(-10, 7000, allow_nan=False) | st.integers(-10, 7000),
    "hour": st.integers(-1, 25),
    "minute": st.integers(-1, 61),
    "time_hour": st.sampled_from(["2013-11-05T18:00:00Z", "2013-01-01T05:00:00Z", "2013-06-30 23:00:00"]),
}


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(rows=st.lists(st.fixed_dictionaries(raw_values), min_size=1, max_size=4))
def test_generated_rows_agree_or_are_declined(online, rows) -> None:
    model, featurizer, encoder = online
    assume(not request_problems(featurizer, rows))  # a 422 before any feature, on either path
    fast = encoder.encode(rows)
    if fast is None:  # e.g. a null sched_dep_time reaching a comparison: the Featurizer decides
        return
    matrix, problems = fast
    expected, expected_problems = _reference(model, featurizer, rows)
    assert [(p.row, p.field, p.msg) for p in problems] == expected_problems
    np.testing.assert_array_equal(matrix, expected)
