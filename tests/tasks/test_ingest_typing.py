"""``type_partition``: the Arrow-vectorised typing keeps the per-value semantics (and reasons) of the
pandas parse it replaced, for text cells and for columns a parquet source already typed."""

from __future__ import annotations

import numpy as np
import pandas as pd

from conveyor.tasks.ingest import REASON, type_partition
from conveyor.tasks.schema import TableSchema

SCHEMA = TableSchema.of("t", {"i": "int", "f": "float", "s": "str", "b": "bool", "ts": "timestamp"}, ["-"])


def test_text_cells_are_typed_or_get_the_first_failing_columns_reason() -> None:
    raw = pd.DataFrame(
        {
            "i": [" 2 ", "1.0", "1.5", "NA", "-", "7"],
            "f": ["inf", "soon", "1e-3", "", "NaN", "x"],
            "s": [" a ", "NA", "b", "null", "é", "c"],
            "b": ["YES", "0", "maybe", "", "true", "no"],
            "ts": [
                "2013-01-01T10:00:00Z",
                "2013-01-01 05:00:00",
                "",
                "2013-01-01T10:00:00+02:00",
                "nope",
                "NA",
            ],
        },
        index=[10, 11, 12, 13, 14, 15],
    )
    out = type_partition(raw, SCHEMA)
    assert list(out.index) == [10, 11, 12, 13, 14, 15]
    assert out["i"].dtype == "Int64" and out["f"].dtype == "float64" and out["b"].dtype == "boolean"
    assert str(out["ts"].dtype) == "datetime64[ns, UTC]" and out["s"].dtype == "string"
    assert out["i"].tolist()[:2] == [2, 1] and out["i"].isna().tolist()[3:5] == [True, True]
    assert out.loc[10, "f"] == np.inf and out.loc[12, "f"] == 0.001
    assert out.loc[10, "s"] == "a" and out["s"].isna().tolist()[1] and out["s"].isna().tolist()[3]
    assert out.loc[10, "b"] and not out.loc[11, "b"]
    assert out.loc[11, "ts"] == pd.Timestamp("2013-01-01 05:00", tz="UTC")
    assert out.loc[13, "ts"] == pd.Timestamp("2013-01-01 08:00", tz="UTC")
    reasons = out[REASON]
    assert reasons[10] is pd.NA and reasons[13] is pd.NA
    assert reasons[11] == "f: cannot parse 'soon' as float"
    assert reasons[12] == "i: cannot parse '1.5' as int"  # the first failing column names the row
    assert reasons[14] == "ts: cannot parse 'nope' as timestamp"
    assert reasons[15] == "f: cannot parse 'x' as float"


def test_columns_a_parquet_source_already_typed() -> None:
    raw = pd.DataFrame(
        {
            "i": [1.0, 1.5, np.nan],
            "f": [1, 2, 3],
            "s": ["x", None, "z"],
            "b": [True, False, True],
            "ts": pd.to_datetime(["2013-01-01", None, "2013-01-02"]),
        }
    )
    out = type_partition(raw, SCHEMA)
    assert out["i"].tolist()[0] == 1 and out["i"].isna().tolist()[1:] == [True, True]
    assert out[REASON].tolist()[1] == "i: cannot parse '1.5' as int"
    assert out[REASON].isna().tolist() == [True, False, True]  # NaN is no value, not a bad one
    assert out["ts"].iloc[0] == pd.Timestamp("2013-01-01", tz="UTC")


def test_empty_partition_keeps_the_typed_columns() -> None:
    out = type_partition(pd.DataFrame({c: pd.Series(dtype="string") for c in SCHEMA.names}), SCHEMA)
    assert list(out.columns) == [*SCHEMA.names, REASON] and len(out) == 0
    assert out["i"].dtype == "Int64"
