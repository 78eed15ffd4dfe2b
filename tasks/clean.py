"""Clean: bronze flights -> validated, de-duplicated, joined silver features.

Rules are declared in one place (``RULES``); a row that breaks one goes to
quarantine with the rule's reason, an exact duplicate goes there as a
duplicate, and ``rows_in == rows_out + rows_quarantined`` is checked before
the silver version is committed. Features are only what is known before
departure: the schedule, carrier, route, aircraft and weather at the origin.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd

from conveyor.store.storage import (
    DatasetRef,
    StorageError,
    Store,
    clear_version,
    code_version,
    commit_dataset,
    committed,
    content_version,
    open_manifest,
    read_dataset,
    read_dataset_pandas,
)
from conveyor.tasks.ingest import REASON, IngestResult
from conveyor.tasks.schema import POST_DEPARTURE

LATE_MINUTES = 15
LABEL = "is_late"
TIME_KEY = "sched_dep"
CATEGORICAL = ("carrier", "origin", "dest")
WEATHER_FEATURES = (
    "temp",
    "dewp",
    "humid",
    "wind_dir",
    "wind_speed",
    "wind_gust",
    "precip",
    "pressure",
    "visib",
)
PLANE_FEATURES = ("plane_age", "seats", "engines")
FEATURES = (
    "month",
    "day_of_week",
    "day_of_year",
    "sched_dep_hour",
    "sched_dep_minute_of_day",
    "sched_arr_minute_of_day",
    "sched_duration",
    "distance",
    *CATEGORICAL,
    *WEATHER_FEATURES,
    *PLANE_FEATURES,
)
assert not POST_DEPARTURE & set(FEATURES), "a post-departure column is listed as a feature"

REQUIRED = (
    "year",
    "month",
    "day",
    "sched_dep_time",
    "sched_arr_time",
    "carrier",
    "origin",
    "dest",
    "distance",
    "hour",
    "minute",
    "time_hour",
)


def _hhmm_ok(v: pd.Series) -> pd.Series:
    return (v // 100).between(0, 24) & (v % 100).between(0, 59)


# (reason, predicate that is True for rows that pass); nulls in required fields are checked first.
RULES: tuple[tuple[str, Callable[[pd.DataFrame, Dimensions], pd.Series]], ...] = (
    ("arr_delay is missing: cancelled or diverted flight, no label", lambda d, _: d["arr_delay"].notna()),
    ("month outside 1..12", lambda d, _: d["month"].between(1, 12)),
    ("day outside 1..31", lambda d, _: d["day"].between(1, 31)),
    ("hour outside 0..23", lambda d, _: d["hour"].between(0, 23)),
    ("minute outside 0..59", lambda d, _: d["minute"].between(0, 59)),
    ("sched_dep_time is not a valid HHMM", lambda d, _: _hhmm_ok(d["sched_dep_time"])),
    ("sched_arr_time is not a valid HHMM", lambda d, _: _hhmm_ok(d["sched_arr_time"])),
    ("distance outside 1..6000 miles", lambda d, _: d["distance"].between(1, 6000)),
    ("arr_delay outside -180..2000 minutes", lambda d, _: d["arr_delay"].between(-180, 2000)),
    ("carrier not in the airlines table", lambda d, dims: d["carrier"].isin(dims.carriers)),
    ("origin not in the airports table", lambda d, dims: d["origin"].isin(dims.airports)),
    (
        "dest is not a 3-character airport code",
        lambda d, _: d["dest"].str.fullmatch(r"[A-Z0-9]{3}").fillna(False),
    ),
)


@dataclass(frozen=True)
class Dimensions:
    """The small tables, broadcast to every partition."""

    carriers: list[str]
    airports: list[str]
    weather: pd.DataFrame  # one row per (origin, time_hour)
    planes: pd.DataFrame  # one row per tailnum


@dataclass(frozen=True)
class CleanResult:
    silver: DatasetRef
    quarantine: DatasetRef
    rows_in: int
    quarantine_reasons: dict[str, int]
    features: list[str]
    categories: dict[str, list[str]]
    reused: bool = False  # found committed from an earlier run, not recomputed


def reasons_for(flights: pd.DataFrame, dims: Dimensions) -> pd.Series:
    """The first broken rule of each row (NA where the row is valid)."""
    reason = pd.Series(pd.NA, index=flights.index, dtype="string")
    for col in REQUIRED:
        reason = reason.mask(reason.isna() & flights[col].isna(), f"{col} is missing")
    for text, passes in RULES:
        ok = passes(flights, dims).fillna(False).astype(bool)
        reason = reason.mask(reason.isna() & ~ok, text)
    return reason


def _row_hash(part: pd.DataFrame, partition_info: dict | None = None) -> pd.DataFrame:
    pid = partition_info["number"] if partition_info else 0
    return pd.DataFrame(
        {
            "h": pd.util.hash_pandas_object(part, index=False).to_numpy(),
            "partition": np.full(len(part), pid, dtype="int64"),
            "position": np.arange(len(part), dtype="int64"),
        },
        index=part.index,
    )


def find_duplicates(flights: dd.DataFrame) -> set[tuple[int, int]]:
    """(partition, position) of every exact duplicate after its first occurrence."""
    hashes = flights.map_partitions(
        _row_hash, meta={"h": "uint64", "partition": "int64", "position": "int64"}
    )
    with dask.config.set({"dataframe.shuffle.method": "tasks"}):
        counts = hashes["h"].value_counts(split_out=max(1, flights.npartitions // 4))
        repeated = counts[counts > 1].compute()
    if repeated.empty:
        return set()
    repeated_set = set(repeated.index.tolist())
    rows = hashes[hashes["h"].isin(repeated_set)].compute().sort_values(["h", "partition", "position"])
    later = rows[rows.duplicated("h", keep="first")]
    return set(zip(later["partition"].tolist(), later["position"].tolist(), strict=False))


def _mark(
    part: pd.DataFrame, dims: Dimensions, duplicates: set[tuple[int, int]], partition_info: dict | None = None
) -> pd.DataFrame:
    pid = partition_info["number"] if partition_info else 0
    reason = reasons_for(part, dims)
    if duplicates:
        dup = pd.Series([(pid, i) in duplicates for i in range(len(part))], index=part.index)
        reason = reason.mask(reason.isna() & dup, "exact duplicate of an earlier row")
    return part.assign(**{REASON: reason})


def build_features(flights: pd.DataFrame, dims: Dimensions) -> pd.DataFrame:
    """Pre-departure features + label for valid rows."""
    f = flights
    dep_min = (f["sched_dep_time"] // 100) * 60 + f["sched_dep_time"] % 100
    arr_min = (f["sched_arr_time"] // 100) * 60 + f["sched_arr_time"] % 100
    local_day = pd.to_datetime(
        pd.DataFrame({"year": f["year"], "month": f["month"], "day": f["day"]}).astype("int64"),
        errors="coerce",
    )
    out = pd.DataFrame(
        {
            TIME_KEY: f["time_hour"],
            "month": f["month"].astype("int16"),
            "day_of_week": local_day.dt.day_of_week.astype("int16"),
            "day_of_year": local_day.dt.day_of_year.astype("int16"),
            "sched_dep_hour": f["hour"].astype("int16"),
            "sched_dep_minute_of_day": dep_min.astype("int16"),
            "sched_arr_minute_of_day": arr_min.astype("int16"),
            "sched_duration": ((arr_min - dep_min) % 1440).astype("int16"),
            "distance": f["distance"].astype("float32"),
            "carrier": f["carrier"].astype("string"),
            "origin": f["origin"].astype("string"),
            "dest": f["dest"].astype("string"),
            "tailnum": f["tailnum"].astype("string"),
        },
        index=f.index,
    )
    out = out.merge(dims.weather, how="left", left_on=["origin", TIME_KEY], right_on=["origin", "time_hour"])
    out = out.merge(dims.planes, how="left", on="tailnum")
    out["plane_age"] = (
        f["year"].to_numpy(dtype="float64") - out.pop("plane_year").to_numpy(dtype="float64")
    ).astype("float32")
    out[LABEL] = (f["arr_delay"].to_numpy() > LATE_MINUTES).astype("int8")
    for col in WEATHER_FEATURES:
        out[col] = out[col].astype("float32")
    for col in ("seats", "engines"):
        out[col] = out[col].astype("float32")
    return out[[TIME_KEY, *FEATURES, LABEL]]


def load_dimensions(store: Store, ingested: IngestResult) -> Dimensions:
    t = ingested.tables
    weather = read_dataset_pandas(store, t["weather"].bronze.url, ["origin", "time_hour", *WEATHER_FEATURES])
    # The source repeats a few (origin, hour) readings; one reading per hour keeps the join 1:1.
    weather = weather.drop_duplicates(["origin", "time_hour"], keep="first")
    planes = read_dataset_pandas(store, t["planes"].bronze.url, ["tailnum", "year", "seats", "engines"])
    planes = planes.rename(columns={"year": "plane_year"}).drop_duplicates("tailnum", keep="first")
    carriers = read_dataset_pandas(store, t["airlines"].bronze.url, ["carrier"])["carrier"].dropna()
    airports = read_dataset_pandas(store, t["airports"].bronze.url, ["faa"])["faa"].dropna()
    return Dimensions(
        carriers=sorted(carriers.astype(str).unique()),
        airports=sorted(airports.astype(str).unique()),
        weather=weather,
        planes=planes,
    )


def clean(store: Store, ingested: IngestResult, client: Any) -> CleanResult:
    flights_in = ingested.tables["flights"].bronze
    version = content_version(
        "clean", {k: v.bronze.version for k, v in ingested.tables.items()}, code_version("clean")
    )
    silver_url = store.dataset_url("silver_flights", version)
    q_url = store.quarantine_url("silver_flights", version)
    done, q_done = (
        committed(store, "silver_flights", version),
        committed(store, "silver_flights", version, q_url),
    )
    if done is not None and q_done is not None:
        return dataclasses.replace(_result(store, done, q_done, flights_in.rows), reused=True)

    dims = load_dimensions(store, ingested)
    flights = read_dataset(store, flights_in.url)
    duplicates = find_duplicates(flights)
    marked = flights.map_partitions(
        _mark, dims, duplicates, meta=flights._meta.assign(**{REASON: pd.Series(dtype="string")})
    )
    valid = marked[marked[REASON].isna()].drop(columns=[REASON])
    features = valid.map_partitions(build_features, dims, meta=build_features(flights._meta, dims))
    rejected = marked[~marked[REASON].isna()]

    for target in (silver_url, q_url):
        clear_version(store, target)
    write = {
        "write_index": False,
        "storage_options": store.options,
        "compute": False,
        "write_metadata_file": False,
        "name_function": lambda i: f"part-{i:05d}.parquet",
    }
    dask.compute(features.to_parquet(silver_url, **write), rejected.to_parquet(q_url, **write))

    silver_parts = dd.read_parquet(silver_url, columns=list(CATEGORICAL), storage_options=store.options)
    categories = dask.compute({c: silver_parts[c].dropna().unique() for c in CATEGORICAL})[0]
    categories = {c: sorted(map(str, v.tolist())) for c, v in categories.items()}
    categories["carrier"] = sorted(set(categories["carrier"]) | set(dims.carriers))
    lineage = {"bronze": {k: v.bronze.version for k, v in ingested.tables.items()}}
    q = commit_dataset(store, "silver_flights", version, q_url, lineage | {"of": "silver_flights"})
    extra = {
        "features": list(FEATURES),
        "label": LABEL,
        "time_key": TIME_KEY,
        "categories": categories,
        "late_minutes": LATE_MINUTES,
    }
    silver = commit_dataset(store, "silver_flights", version, silver_url, lineage, extra=extra)
    return _result(store, silver, q, flights_in.rows)


def _result(store: Store, silver: DatasetRef, q: DatasetRef, rows_in: int) -> CleanResult:
    if rows_in != silver.rows + q.rows:
        raise StorageError(
            f"clean lost rows: {rows_in} in, {silver.rows} silver + {q.rows} quarantined "
            f"= {silver.rows + q.rows}"
        )
    reasons: dict[str, int] = {}
    if q.rows:
        counts = read_dataset(store, q.url, columns=[REASON])[REASON].value_counts().compute()
        reasons = {str(k): int(v) for k, v in counts.sort_values(ascending=False).items()}
    extra = open_manifest(store, silver.url).extra
    return CleanResult(
        silver=silver,
        quarantine=q,
        rows_in=rows_in,
        quarantine_reasons=reasons,
        features=list(extra["features"]),
        categories=extra["categories"],
    )
