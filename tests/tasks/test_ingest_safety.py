"""Ingest on hostile or unusual bytes: a stray invalid byte, a declared text encoding, a decompression
bomb."""

from __future__ import annotations

import dataclasses
import gzip

import pandas as pd
import pytest
from pydantic import ValidationError

from conveyor.errors import InputError
from conveyor.policy import is_transient
from conveyor.store.storage import Store, read_dataset_pandas
from conveyor.tasks import ingest
from conveyor.tasks.ingest import REASON
from conveyor.tasks.spec import SourceSpec, load_spec
from tests.support import source_with


def _flights(source) -> pd.DataFrame:
    return pd.read_csv(source / "flights.csv", dtype=str, keep_default_na=False)


def test_invalid_utf8_byte_quarantines_its_row_only(tmp_path, small_source, dask_client) -> None:
    src = source_with(small_source, tmp_path / "src", _flights(small_source))
    text = (src / "flights.csv").read_bytes()
    lines = text.split(b"\n")
    lines[3] = lines[3].replace(b",AA,", b",A\xff,", 1)  # data row 3: one byte that is not UTF-8
    assert b"\xff" in lines[3]
    (src / "flights.csv").write_bytes(b"\n".join(lines))
    store = Store.from_url(str(tmp_path / "store"))

    ingested = ingest.ingest(store, dask_client, src.as_uri())
    flights = ingested.tables["flights"]
    assert flights.rows_read == len(lines) - 2  # header and the trailing newline
    bad = read_dataset_pandas(store, flights.quarantine.url)
    assert len(bad) == 1
    reason = bad[REASON].iloc[0]
    assert reason.startswith("carrier: invalid UTF-8 byte 0xff at byte 1 of the value (data row 3;")
    assert bad["carrier"].iloc[0] == "A\ufffd"  # kept for the user to see, the bad byte marked
    assert flights.bronze.rows == flights.rows_read - 1


def test_declared_encoding_reads_latin1(tmp_path, small_source, dask_client) -> None:
    src = source_with(small_source, tmp_path / "src", _flights(small_source))
    airports = pd.read_csv(src / "airports.csv", dtype=str, keep_default_na=False)
    airports.loc[0, "name"] = "Zürich Flughafen"
    airports.to_csv(src / "airports.csv", index=False, encoding="latin-1")
    loaded = load_spec("flights")
    sources = dict(loaded.spec.sources)
    sources["airports"] = sources["airports"].model_copy(update={"encoding": "latin-1"})
    loaded = dataclasses.replace(loaded, spec=loaded.spec.model_copy(update={"sources": sources}))
    store = Store.from_url(str(tmp_path / "store"))

    ingested = ingest.ingest(store, dask_client, src.as_uri(), loaded=loaded)
    table = ingested.tables["airports"]
    assert table.quarantine.rows == 0
    names = read_dataset_pandas(store, table.bronze.url)["name"]
    assert names.iloc[0] == "Zürich Flughafen"


def test_unknown_encoding_is_a_spec_error() -> None:
    with pytest.raises(ValidationError, match="unknown encoding 'utf-9'"):
        SourceSpec.model_validate({"url": "x.csv", "columns": {"a": "str"}, "encoding": "utf-9"})


def test_decompression_bomb_fails_fast_and_is_not_retried(
    tmp_path, small_source, dask_client, monkeypatch
) -> None:
    src = source_with(small_source, tmp_path / "src", _flights(small_source))
    plain = (src / "flights.csv").read_bytes()
    (src / "flights.csv").unlink()
    (src / "flights.csv.gz").write_bytes(gzip.compress(plain))
    monkeypatch.setenv("CONVEYOR_MAX_DECOMPRESSED_BYTES", str(len(plain) // 4))

    with pytest.raises(InputError, match="CONVEYOR_MAX_DECOMPRESSED_BYTES") as err:
        ingest.ingest(Store.from_url(str(tmp_path / "store")), dask_client, src.as_uri())
    assert "flights.csv.gz" in str(err.value)
    assert not is_transient(err.value)  # the retry policy gives up at once


def test_bomb_found_while_streaming_on_a_worker_is_not_retried(
    tmp_path, small_source, dask_client, monkeypatch
) -> None:
    """Past the head the driver probes: the worker streaming the file stops at the cap."""
    flights = _flights(small_source)
    src = source_with(small_source, tmp_path / "src", pd.concat([flights] * 12, ignore_index=True))
    plain = (src / "flights.csv").read_bytes()
    (src / "flights.csv").unlink()
    (src / "flights.csv.gz").write_bytes(gzip.compress(plain))
    monkeypatch.setenv("CONVEYOR_MAX_DECOMPRESSED_BYTES", str(len(plain) // 2))  # past the probe's block

    with pytest.raises(InputError, match="CONVEYOR_MAX_DECOMPRESSED_BYTES") as err:
        ingest.ingest(Store.from_url(str(tmp_path / "store")), dask_client, src.as_uri())
    assert not is_transient(err.value)


def test_gzip_source_under_the_cap_reads_every_row(tmp_path, small_source, dask_client) -> None:
    flights = _flights(small_source)
    src = source_with(small_source, tmp_path / "src", flights)
    (src / "flights.csv.gz").write_bytes(gzip.compress((src / "flights.csv").read_bytes()))
    (src / "flights.csv").unlink()

    ingested = ingest.ingest(Store.from_url(str(tmp_path / "store")), dask_client, src.as_uri())
    assert ingested.tables["flights"].rows_read == len(flights)
