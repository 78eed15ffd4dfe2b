"""Pipeline specs: every bad spec fails before compute with one message naming file, field and column."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conveyor.errors import SpecError
from conveyor.tasks.clean import Lookups, prepare, reasons_for
from conveyor.tasks.spec import Expression, load_spec, shipped_specs
from tests.support import REPO_ROOT

FLIGHTS = yaml.safe_load((REPO_ROOT / "pipelines" / "flights.yaml").read_text())


def _write(tmp_path: Path, spec: dict, name: str = "bad.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def _variant(**changes) -> dict:
    spec = yaml.safe_load(yaml.safe_dump(FLIGHTS))
    for dotted, value in changes.items():
        node = spec
        *parents, last = dotted.split("__")
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[last] = value
    return spec


def test_shipped_specs_load_and_are_listed() -> None:
    assert {"flights", "county_murders"} <= set(shipped_specs())
    flights = load_spec("flights")
    assert flights.spec.label.task == "binary" and flights.label_columns == ["arr_delay"]
    assert load_spec("county_murders").spec.label.task == "regression"


@pytest.mark.parametrize(
    ("changes", "field", "column"),
    [
        ({"features__include": [*FLIGHTS["features"]["include"], "wheels"]}, "features.include", "wheels"),
        (
            {"features__include": [*FLIGHTS["features"]["include"], "dep_delay"]},
            "features.include",
            "dep_delay",
        ),
        ({"label__expression": "arrival_delay > 15"}, "label.expression", "arrival_delay"),
        ({"joins__1__by": {"tail_number": "tailnum"}}, "joins[1].by", "tail_number"),
        ({"joins__1__by": {"tailnum": "registration"}}, "joins[1].by", "registration"),
        (
            {"split": {"kind": "time", "train_end": "2013-10-01", "valid_end": "2013-09-01"}},
            "split.valid_end",
            "",
        ),
        ({"sources__flights__columns__year": "integer"}, "sources.flights.columns.year", ""),
        ({"rules__1__column": "months"}, "rules[1].column", "months"),
        ({"baseline": ["carrier", "arr_delay"]}, "baseline", "arr_delay"),
        (
            {
                "derived__delay_hint": "dep_delay * 2",
                "features__include": [*FLIGHTS["features"]["include"], "delay_hint"],
            },
            "features.include",
            "dep_delay",
        ),
        ({"derived__evil": "__import__('os').system('true')"}, "derived.evil", ""),
        ({"gate_metric": "rmse"}, "gate_metric", "rmse"),
    ],
    ids=[
        "unknown-feature",
        "forbidden-feature",
        "label-missing-column",
        "join-key-main",
        "join-key-lookup",
        "empty-valid-slice",
        "bad-type",
        "rule-column",
        "baseline-not-feature",
        "leak-through-derived",
        "unsafe-expression",
        "metric-of-another-task",
    ],
)
def test_bad_spec_fails_naming_file_field_and_column(tmp_path: Path, changes, field, column) -> None:
    path = _write(tmp_path, _variant(**changes))
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: {field}"), message
    assert column in message


def test_unknown_spec_field_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, _variant(lable="typo"))
    with pytest.raises(SpecError, match=r"bad.yaml: lable: Extra inputs are not permitted"):
        load_spec(path)


def test_check_spec_prints_one_line_and_no_traceback(tmp_path: Path) -> None:
    path = _write(tmp_path, _variant(features__include=["month", "air_time"]))
    proc = subprocess.run(
        [sys.executable, "-m", "conveyor", "check-spec", path], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1
    error, *hint = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and len(hint) <= 1  # one line, and at most one hint line
    assert "features.include" in error and "air_time" in error
    ok = subprocess.run(
        [sys.executable, "-m", "conveyor", "check-spec", "flights"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0 and "ok" in ok.stdout


def test_init_drafts_a_spec_that_checks(tmp_path: Path) -> None:
    rng = pd.date_range("2024-01-01", periods=200, freq="D")
    frame = pd.DataFrame(
        {
            "customer_id": range(200),
            "signup": rng.strftime("%Y-%m-%d"),
            "plan": ["basic", "pro"] * 100,
            "spend": [float(i % 17) for i in range(200)],
            "churned": [i % 3 == 0 for i in range(200)],
        }
    )
    frame["churned"] = frame["churned"].astype(int)
    source = tmp_path / "customers.csv"
    frame.to_csv(source, index=False)
    out = tmp_path / "customers.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", "conveyor", "init", "--from", str(source), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    loaded = load_spec(str(out))
    assert loaded.spec.label.column == "churned" and loaded.spec.label.task == "binary"
    assert loaded.spec.time == "signup" and "customer_id" not in loaded.spec.features.include
    assert loaded.spec.features.categorical == ["plan"]


def test_expressions_allow_only_the_vocabulary() -> None:
    frame = pd.DataFrame({"a": [1, 2, 3], "hhmm": [930, 1745, 5]})
    assert Expression("hhmm_to_minutes(hhmm)").evaluate(frame).tolist() == [570, 1065, 5]
    assert Expression("(a > 1) & (a < 3)").evaluate(frame).tolist() == [False, True, False]
    for bad in ("a.__class__", "open('x')", "[a for a in b]", "lambda: 1", "a[0]"):
        with pytest.raises(ValueError, match="not allowed"):
            Expression(bad)


def _lookup_spec(tmp_path: Path, join: dict) -> object:
    spec = {
        "name": "orders",
        "model": "orders_late",
        "sources": {
            "orders": {
                "url": "memory://orders.csv",
                "columns": {"id": "int", "store": "str", "at": "timestamp", "late": "int"},
            },
            "prices": {
                "url": "memory://prices.csv",
                "columns": {"store": "str", "since": "timestamp", "price": "float"},
            },
        },
        "main": "orders",
        "time": "at",
        "joins": [join],
        "label": {"name": "is_late", "column": "late", "task": "binary"},
        "features": {"include": ["store", "price"], "categorical": ["store"]},
        "split": {"kind": "ratio"},
    }
    return load_spec(_write(tmp_path, spec, "orders.yaml"))


def test_asof_join_looks_backward_only_within_tolerance(tmp_path: Path) -> None:
    loaded = _lookup_spec(
        tmp_path,
        {
            "table": "prices",
            "by": {"store": "store"},
            "how": "asof",
            "asof": {"at": "since"},
            "tolerance": "2h",
            "columns": {"price": "price"},
            "missing": "quarantine",
        },
    )
    t = pd.Timestamp("2024-01-01 10:00", tz="UTC")
    orders = pd.DataFrame(
        {
            "id": [1, 2, 3, 4],
            "store": ["a", "a", "b", "a"],
            "at": [t, t + pd.Timedelta("1h"), t, t + pd.Timedelta("5h")],
            "late": [0, 1, 0, 1],
        },
        index=[10, 11, 12, 13],
    )
    prices = pd.DataFrame(
        {
            "store": ["a", "a", "b"],
            "since": [t - pd.Timedelta("30min"), t + pd.Timedelta("30min"), t + pd.Timedelta("1h")],
            "price": [1.0, 2.0, 9.0],
        }
    )
    frame, no_match = prepare(orders, loaded, Lookups(joins=[prices], members={}))
    assert frame.index.tolist() == [10, 11, 12, 13]  # rows keep their order and index
    # order 1: the 09:30 price (10:30 is in its future); order 2: the 10:30 price; order 3: store b's
    # only price is later (no backward match); order 4: the latest price is 4.5 h old (> 2 h tolerance).
    assert frame["price"].tolist()[:2] == [1.0, 2.0] and frame["price"].isna().tolist()[2:] == [True, True]
    reasons = reasons_for(frame, no_match, loaded, Lookups(joins=[prices], members={}))
    assert reasons.isna().tolist() == [True, True, False, False]
    assert reasons.iloc[2] == "no prices row matches store"


def test_a_hook_adds_feature_code_a_spec_cannot_express(tmp_path: Path, monkeypatch) -> None:
    module = tmp_path / "my_features.py"
    module.write_text(
        "def add_weekend(frame):\n    frame['weekend'] = frame['at'].dt.day_of_week >= 5\n    return frame\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = {
        "name": "orders",
        "model": "orders_late",
        "sources": {"orders": {"url": "memory://o.csv", "columns": {"at": "timestamp", "late": "int"}}},
        "main": "orders",
        "time": "at",
        "hooks": [{"function": "my_features:add_weekend", "adds": ["weekend"]}],
        "label": {"name": "is_late", "column": "late", "task": "binary"},
        "features": {"include": ["weekend"]},
        "split": {"kind": "ratio"},
    }
    loaded = load_spec(_write(tmp_path, spec, "hooked.yaml"))
    orders = pd.DataFrame({"at": pd.to_datetime(["2024-01-05", "2024-01-06"], utc=True), "late": [0, 1]})
    frame, _ = prepare(orders, loaded, Lookups(joins=[], members={}))
    assert frame["weekend"].tolist() == [False, True]


def test_a_spec_can_be_a_prefect_task_parameter() -> None:
    """Prefect walks task parameters with ``dict(model)``: a spec field named ``keys`` broke that once."""
    from prefect.utilities.collections import visit_collection

    for name in shipped_specs():
        loaded = load_spec(name)
        assert visit_collection(loaded, lambda x: x, return_data=True) == loaded
