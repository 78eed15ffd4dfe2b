"""Raw, unlabelled rows -> the model's features: the spec's own code, in inference mode.

Training, batch scoring and serving compute features with one code path
(``conveyor.tasks.clean``): the same typing as ingest, the same rules (label
rules skipped), the same lookup joins against the lookup tables committed with
the model's training data, the same derived columns. Only the label is absent.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime
import itertools
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from conveyor.store.storage import Store, open_manifest
from conveyor.tasks.clean import (
    REASONS_KEY,
    Lookups,
    _is_label_rule,
    features_of,
    lookups_from,
    prepare,
    quarantine_reasons,
    reasons_by_count,
    reasons_for,
)
from conveyor.tasks.ingest import NA_TOKENS, REASON, type_partition
from conveyor.tasks.schema import TableSchema
from conveyor.tasks.spec import Expression, LoadedSpec, PipelineSpec, SilverSchema


@dataclass(frozen=True)
class Featurizer:
    """Everything needed to turn raw main-table rows into feature rows for one trained model."""

    loaded: LoadedSpec
    lookups: Lookups
    schema: SilverSchema
    raw_schema: TableSchema  # the main table's columns a row may carry (label and forbidden ones left out)
    lookup_versions: dict[str, str]  # lookup table -> the bronze version its rows come from

    @property
    def required(self) -> list[str]:
        """Fields a raw row must carry (the spec's ``required`` columns)."""
        return [c for c in self.loaded.spec.required if c in self.raw_schema.names]

    @property
    def optional(self) -> list[str]:
        return [c for c in self.raw_schema.names if c not in self.required]

    def featurize(self, raw: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series]:
        """Typed features (time key first) and, per row, the reason it cannot be scored (NA if it can)."""
        features, reasons, _ = self.featurize_full(raw)
        return features, reasons

    def featurize_full(self, raw: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series, pd.DataFrame]:
        """:meth:`featurize`, plus the typed raw columns (what a scored row can carry along)."""
        text = pd.DataFrame(index=raw.index)
        for col in self.raw_schema.names:
            values = raw[col] if col in raw.columns else pd.Series(pd.NA, index=raw.index)
            text[col] = values.astype("string")
        typed = type_partition(text, self.raw_schema)
        parse_reason = typed.pop(REASON)
        spec = self.loaded.spec
        for col, kind in spec.sources[spec.main].columns.items():
            if col not in typed.columns:  # label and forbidden columns: absent at prediction time
                typed[col] = pd.Series(
                    pd.NA, index=typed.index, dtype="Float64" if kind != "str" else "string"
                )
        frame, no_match = prepare(typed, self.loaded, self.lookups)
        reasons = reasons_for(frame, no_match, self.loaded, self.lookups, inference=True)
        kept = typed[list(self.raw_schema.names)]
        return features_of(frame, self.schema), parse_reason.fillna(reasons), kept


def featurizer_for_silver(store: Store, silver_url: str) -> Featurizer:
    """The featurizer of the spec a silver version was cleaned with, and the lookups it joined."""
    manifest = open_manifest(store, silver_url)
    extra = manifest.extra
    if "spec_document" not in extra:
        raise ValueError(f"{silver_url}: its manifest has no spec (cleaned before pipeline specs); retrain")
    schema = SilverSchema.from_extra(extra)
    spec = PipelineSpec.model_validate(extra["spec_document"])
    loaded = LoadedSpec(spec, f"{silver_url} (spec {schema.spec_version})", schema.spec_version)
    bronze = dict(manifest.lineage.get("bronze", {}))
    lookup_tables = {j.table for j in spec.joins} | {
        ref.partition(".")[0]
        for ref in [f"{r.table}.{r.table_column}" for r in spec.rules if r.check == "in_table"]
        + [c.levels_from or "" for c in spec.features.categorical_specs()]
        if ref
    }
    urls = {t: store.dataset_url(f"bronze_{t}", bronze[t]) for t in lookup_tables}
    lookups = lookups_from(store, loaded, urls)
    leaky = set(loaded.label_columns) | set(spec.features.forbidden)
    main = spec.sources[spec.main]
    raw_schema = TableSchema.of(
        spec.main, {c: k for c, k in main.columns.items() if c not in leaky}, main.na_values
    )
    return Featurizer(loaded, lookups, schema, raw_schema, {t: bronze[t] for t in lookup_tables})


def featurizer_for_card(store: Store, card: dict[str, Any]) -> Featurizer:
    silver_url = (card.get("datasets") or {}).get("silver_url")
    if not silver_url:
        raise ValueError(f"model {card.get('model')} {card.get('version')}: its card names no silver dataset")
    return featurizer_for_silver(store, silver_url)


# --- batch: raw files -> a committed predictions dataset, rejected rows reported -----------------

SPEC_VERSION = "spec_version"


def _featurize_and_score(
    part: pd.DataFrame,
    featurizer: Featurizer,
    keep: list[str],
    raw_model: Any,
    version: str,
    model_file: str,
    threshold: float,
    target: Any,
) -> pd.DataFrame:
    from conveyor.tasks.scoring import _score_part

    features, reasons, typed = featurizer.featurize_full(part)
    frame = pd.concat(
        [typed[keep], features.drop(columns=[c for c in keep if c in features.columns])], axis=1
    )
    valid = reasons.isna().to_numpy()
    scored = _score_part(
        frame[valid],
        raw_model,
        version,
        featurizer.schema.features,
        featurizer.schema.categories,
        threshold,
        keep,
        model_file,
        target,
    )
    rejected = typed[~valid][keep].reset_index(drop=True)
    out = pd.concat([scored, rejected], ignore_index=True)[list(scored.columns)]
    out[REASON] = pd.array([pd.NA] * int(valid.sum()) + list(reasons[~valid]), dtype="string")
    out[SPEC_VERSION] = pd.Series([featurizer.schema.spec_version] * len(out), dtype="string")
    return out


def _scored_dtypes(featurizer: Featurizer, keep: list[str], loaded: Any, target: Any) -> dict[str, Any]:
    """The prediction columns' dtypes (rejected rows leave NaN in them until they are split off)."""
    from conveyor.tasks.scoring import _score_part

    empty = featurizer.featurize_full(pd.DataFrame({c: pd.Series(dtype="string") for c in keep}))
    frame = pd.concat(
        [empty[2][keep], empty[0].drop(columns=[c for c in keep if c in empty[0].columns])], axis=1
    )
    meta = _score_part(
        frame,
        b"",
        loaded.version,
        featurizer.schema.features,
        featurizer.schema.categories,
        loaded.threshold,
        keep,
        "model.ubj",
        target,
    )
    return {c: t for c, t in meta.dtypes.items() if c not in keep}


def score_raw(
    store: Store,
    client: Any,
    source_url: str,
    model: str,
    version: str | None = None,
    alias: str = "champion",
    keep: list[str] | None = None,
    output_name: str | None = None,
    export_url: str | None = None,
    source_options: dict[str, Any] | None = None,
    expect_spec: str = "",
) -> Any:
    """Score raw, unlabelled rows of the spec's main table (CSV/parquet, any fsspec URL) with a model.

    Returns a ``ScoringResult`` whose ``quarantined``/``quarantine_reasons`` report the rows left out.

    ``source_url`` is a file, a folder of parquet parts, or a folder holding ``<main>.csv`` etc. Rows
    that cannot be scored (a broken rule, a value that does not parse, no lookup match where the spec
    quarantines) go to ``quarantine/<output_name>/<version>/`` with the reason; predictions, with the
    kept columns, the model version and the spec version, to ``datasets/<output_name>/<version>/``,
    manifest last. ``export_url`` also writes the predictions there (``.csv`` or parquet).
    """
    import dask

    from conveyor.store.storage import (
        clear_version,
        code_version,
        commit_dataset,
        committed,
        content_version,
        parquet_write_options,
    )
    from conveyor.tasks.ingest import _present_columns, _read_raw, find_table
    from conveyor.tasks.scoring import _resolve, _result, card_target, predictions_extra

    options = source_options or {}
    loaded = _resolve(store, model, version, alias)
    featurizer = featurizer_for_card(store, loaded.card)
    if expect_spec and expect_spec not in (featurizer.loaded.spec.name, featurizer.schema.spec_version):
        raise ValueError(
            f"{model} {loaded.version} was trained with spec '{featurizer.loaded.spec.name}', "
            f"not '{expect_spec}'"
        )
    main = featurizer.loaded.spec.main
    url = source_url
    try:
        present = _present_columns(url, options)
    except Exception:  # a folder holding <main>.csv etc., like --source-url for training
        url = find_table(source_url, main, options)
        present = _present_columns(url, options)
    columns = [c for c in present if c in featurizer.raw_schema.names]  # the file's order
    missing = [c for c in featurizer.required if c not in present]
    if missing:
        from conveyor.errors import InputError

        raise InputError(url, missing[0], f"required column is missing (missing: {', '.join(missing)})")
    read_schema = TableSchema.of(
        main, {c: featurizer.raw_schema.kind(c) for c in columns}, list(featurizer.raw_schema.na_values)
    )
    raw = _read_raw(url, read_schema, options).astype("string")
    default_keep = [k for k in featurizer.schema.keys if k in columns] or columns
    keep = list(keep if keep is not None else default_keep)
    unknown = [c for c in keep if c not in columns]
    if unknown:
        raise ValueError(f"{url}: column(s) {unknown} asked to be kept are not raw columns of '{main}'")
    target = card_target(loaded.card)
    name = output_name or f"predictions_{model}"
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(url, **options)
    fingerprint = [
        (p, fs.ukey(p)) for p in ([path] if fs.isfile(path) else sorted(fs.glob(f"{path}/*.parquet")))
    ]
    out_version = content_version(
        "score-raw", fingerprint, loaded.version, keep, featurizer.schema.spec_version, code_version()
    )
    out_url, q_url = store.dataset_url(name, out_version), store.quarantine_url(name, out_version)
    done, q_done = committed(store, name, out_version), committed(store, name, out_version, q_url)
    reused = done is not None and q_done is not None
    if not reused:
        model_file = loaded.card.get("model_file", "model.ubj")
        import posixpath

        with store.fs.open(
            store.path(posixpath.join(store.model_url(model, loaded.version), model_file)), "rb"
        ) as fh:
            raw_model = fh.read()
        [model_future] = client.scatter([raw_model], broadcast=True, hash=False)
        meta = _featurize_and_score(
            raw._meta, featurizer, keep, b"", loaded.version, model_file, loaded.threshold, target
        )
        both = raw.map_partitions(
            _featurize_and_score,
            featurizer,
            keep,
            model_future,
            loaded.version,
            model_file,
            loaded.threshold,
            target,
            meta=meta,
        ).persist()
        scored = (
            both[both[REASON].isna()]
            .drop(columns=[REASON])
            .astype(_scored_dtypes(featurizer, keep, loaded, target))
        )
        rejected = both[~both[REASON].isna()][[*keep, REASON]]
        for target_url in (out_url, q_url):
            clear_version(store, target_url)
        write = parquet_write_options(store)
        # The reasons counted in the same pass, kept in the quarantine's manifest (as clean does).
        _, _, reason_counts = dask.compute(
            scored.to_parquet(out_url, **write),
            rejected.to_parquet(q_url, **write),
            rejected[REASON].value_counts(),
        )
        lineage = {
            "input": {"url": url, "fingerprint": fingerprint},
            "model": {"name": model, "version": loaded.version},
            "spec_version": featurizer.schema.spec_version,
            "lookups": featurizer.lookup_versions,
        }
        q_done = commit_dataset(
            store,
            name,
            out_version,
            q_url,
            lineage | {"of": name},
            extra={REASONS_KEY: reasons_by_count(reason_counts)},
        )
        done = commit_dataset(
            store,
            name,
            out_version,
            out_url,
            lineage,
            extra=predictions_extra(model, loaded, target)
            | {"spec_version": featurizer.schema.spec_version, "kept": keep},
        )
    reasons = quarantine_reasons(store, q_done)
    result = _result(store, done, model, loaded.version, url, reused=reused, target=target)
    exported = export_predictions(store, done.url, export_url, options) if export_url else ""
    return dataclasses.replace(
        result,
        quarantined=q_done.rows,
        quarantine_reasons=reasons,
        quarantine_url=q_done.url,
        exported_to=exported,
    )


def export_predictions(store: Store, predictions_url: str, export_url: str, options: dict[str, Any]) -> str:
    """Copy a committed predictions dataset to a user URL: one CSV file, or parquet parts in a folder."""
    from conveyor.store.storage import read_dataset

    frame = read_dataset(store, predictions_url)
    if export_url.endswith(".csv"):
        frame.to_csv(export_url, single_file=True, index=False, storage_options=options)
    else:
        frame.to_parquet(export_url, write_index=False, storage_options=options, write_metadata_file=False)
    return export_url


# --- online: request rows -> encoded features, or the rule each bad row breaks --------------------


@dataclass(frozen=True)
class RowProblem:
    row: int
    field: str
    msg: str


def request_problems(featurizer: Featurizer, rows: list[dict[str, Any]]) -> list[RowProblem]:
    """Unknown fields and missing required ones: what is wrong with the request before any feature."""
    problems: list[RowProblem] = []
    allowed = set(featurizer.raw_schema.names)
    for i, row in enumerate(rows):
        for name in row:
            if name not in allowed:
                problems.append(
                    RowProblem(i, name, f"unknown field '{name}' (raw fields: {', '.join(sorted(allowed))})")
                )
        for name in featurizer.required:
            if row.get(name) is None:
                problems.append(RowProblem(i, name, f"field '{name}' is required"))
    return problems


def _field_of(featurizer: Featurizer, why: str) -> str:
    """The raw field a quarantine reason names (reasons start with the column), else ``*``."""
    return next((c for c in featurizer.raw_schema.names if why.startswith(c)), "*")


def featurize_rows(
    featurizer: Featurizer, rows: list[dict[str, Any]]
) -> tuple[pd.DataFrame, list[RowProblem]]:
    """Raw request rows -> the time key and features; a row that would be quarantined is a problem naming
    the rule (the caller answers 422). Unknown fields are refused; a missing optional field is null."""
    problems = request_problems(featurizer, rows)
    if problems:
        return pd.DataFrame(), problems
    text = pd.DataFrame(
        {
            c: pd.array([None if r.get(c) is None else str(r[c]) for r in rows], dtype="string")
            for c in featurizer.raw_schema.names
        }
    )
    features, reasons = featurizer.featurize(text)
    for i, why in reasons.items():
        if not pd.isna(why):
            problems.append(
                RowProblem(int(i), _field_of(featurizer, str(why)), f"row would be quarantined: {why}")
            )
    return features, problems


# --- online, feature columns: a batch of feature values straight into the model's matrix ----------


def feature_columns_matrix(
    columns: dict[str, list[Any]],
    features: list[str],
    codes: dict[str, dict[str, float]],
    finite: bool = False,
) -> np.ndarray | None:
    """Feature columns (name -> one value per row, every list one length) -> the float32 matrix
    ``conveyor.tasks.scoring.rows_to_frame`` gives for the same rows; None where a value is not
    plainly valid, as ``conveyor.tasks.scoring.feature_matrix`` declines it (and, in a batch holding
    an integer, for any number past 2**53): the caller then takes the general path. Never a
    different matrix.

    One type pass per column and one numpy conversion for all numeric columns together: a batch
    costs a few C loops over its values, not Python work per row. ``finite``: the values hold no NaN
    float (the parser refused them), so a NaN in the matrix is a null without counting the nulls.
    """
    from conveyor.tasks.scoring import _EXACT_INT, _NUMBER_TYPES, _TEXT_TYPES, FLOAT32_MAX

    try:
        n = len(columns[features[0]])
        out = np.empty((n, len(features)), dtype="float32")
        numeric, has_int = [], False
        for j, name in enumerate(features):
            values = columns[name]
            types = set(map(type, values))
            levels = codes.get(name)
            if levels is None:
                if not types <= _NUMBER_TYPES:
                    return None
                numeric.append(j)
                has_int = has_int or int in types
                continue
            if not types <= _TEXT_TYPES:
                return None
            coded = np.fromiter(map(levels.get, values, itertools.repeat(np.nan)), "float64", n)
            unknown = int(np.isnan(coded).sum())
            if unknown and unknown > values.count(None):  # unseen: missing, if it is text at all
                for v in values:
                    if v is not None and v not in levels:
                        v.encode("utf-8")
            out[:, j] = coded
        if numeric:
            block = np.array([columns[features[j]] for j in numeric], dtype="float64")  # None -> NaN
            missing = np.isnan(block)
            if not finite:
                for j, nans in zip(numeric, missing.sum(axis=1).tolist(), strict=True):
                    if nans and nans != columns[features[j]].count(None):
                        return None  # a NaN number (the JSON fallback reads NaN), not a null
            present = np.abs(np.where(missing, 0.0, block))
            if not (present <= FLOAT32_MAX).all() or (has_int and (present >= _EXACT_INT).any()):
                return None  # infinite, past float32, or an integer past float64's exact range
            out[:, numeric] = block.T
    except (KeyError, IndexError, UnicodeEncodeError, OverflowError):  # OverflowError: past float64
        return None
    return out


# --- online, small batches: the same spec evaluated over numpy arrays -----------------------------
#
# A request holds a few rows; pandas spends far longer per column operation than the work itself.
# FastEncoder evaluates the *same spec objects* (typing, prepare, joins, derived, rules, features,
# encoding) over plain numpy arrays, with the lookup tables indexed once per loaded model. Where
# its arrays could differ from the pandas code's (a null reaching a comparison, a value whose
# parse the Arrow/pandas typing decides, a spec construct it does not know) it declines, and the
# caller takes the Featurizer path: it never guesses. The equivalence tests hold it to that path.

_NUMERIC, _EXACT_INT = ("int", "num"), 2.0**53
_INT_TEXT = re.compile(r"-?[0-9]{1,15}")
_FLOAT_TEXT = re.compile(r"-?[0-9]{1,15}(\.[0-9]{1,15})?")  # short enough that every parser rounds alike
_TIMESTAMP_TEXT = re.compile(r"(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2}):(\d{2})(Z|\+00:00)?")
_ARITHMETIC = {
    ast.Add: np.add,
    ast.Sub: np.subtract,
    ast.Mult: np.multiply,
    ast.Div: np.true_divide,
    ast.FloorDiv: np.floor_divide,
    ast.Mod: np.mod,
    ast.Pow: np.power,
}
_COMPARE = {
    ast.Gt: np.greater,
    ast.GtE: np.greater_equal,
    ast.Lt: np.less,
    ast.LtE: np.less_equal,
    ast.Eq: np.equal,
    ast.NotEq: np.not_equal,
}
_DATE_PARTS = ("day_of_week", "day_of_year", "month_of", "year_of", "hour_of")


class Declined(Exception):
    """The fast path cannot promise the Featurizer's exact result here: take that path instead."""


@dataclass(frozen=True)
class _Col:
    """One column: ``int``/``num`` (float64, NaN = null), ``str`` (object, None = null), ``time``
    (datetime64[ns] in UTC, NaT = null) or ``bool`` (never null)."""

    kind: str
    values: Any

    def null(self) -> np.ndarray:
        if self.kind in _NUMERIC:
            return np.isnan(self.values)
        if self.kind == "time":
            return np.isnat(self.values)
        if self.kind == "str":
            return np.equal(self.values, None)
        return np.zeros(np.shape(self.values), dtype=bool)

    def full(self) -> _Col:
        """Declines if any value is null: comparisons and masks treat pandas' NA unlike NaN."""
        if self.null().any():
            raise Declined("a null reaches a comparison")
        return self


def _num(values: np.ndarray, kind: str) -> _Col:
    if kind == "int" and (np.abs(values) >= _EXACT_INT).any():  # NaN compares False
        raise Declined("an integer past float64's exact range")
    return _Col(kind, values)


def _const(value: Any) -> _Col:
    if isinstance(value, bool):
        return _Col("bool", np.bool_(value))
    if isinstance(value, int):
        return _num(np.float64(value), "int")
    if isinstance(value, float):
        return _Col("num", np.float64(value))
    if isinstance(value, str):
        return _Col("str", value)
    raise Declined(f"constant {value!r}")


def _arith(op: type, a: _Col, b: _Col) -> _Col:
    if a.kind not in _NUMERIC or b.kind not in _NUMERIC:
        raise Declined("arithmetic on non-numbers")
    if op in (ast.Div, ast.FloorDiv, ast.Mod) and np.any(np.asarray(b.values) == 0):
        raise Declined("division by zero")
    both_int = a.kind == b.kind == "int"
    if op is ast.Pow and both_int and np.any(np.asarray(b.values) < 0):
        raise Declined("an integer to a negative power")
    with np.errstate(all="ignore"):
        out = _ARITHMETIC[op](a.values, b.values)
    return _num(np.asarray(out, dtype="float64"), "int" if both_int and op is not ast.Div else "num")


def _compare(op: type, a: _Col, b: _Col) -> _Col:
    a, b = a.full(), b.full()
    if not ((a.kind in _NUMERIC and b.kind in _NUMERIC) or a.kind == b.kind == "str"):
        raise Declined(f"comparing {a.kind} with {b.kind}")
    return _Col("bool", np.asarray(_COMPARE[op](a.values, b.values), dtype=bool))


def _logical(a: _Col, b: _Col, both: bool) -> _Col:
    if a.kind != "bool" or b.kind != "bool":
        raise Declined("& or | on non-booleans")
    return _Col("bool", (a.values & b.values) if both else (a.values | b.values))


def _date(year: _Col, month: _Col, day: _Col, n: int) -> _Col:
    if not all(p.kind in _NUMERIC for p in (year, month, day)):
        raise Declined("date() of non-numbers")
    parts = [np.broadcast_to(np.asarray(p.values, dtype="float64"), (n,)) for p in (year, month, day)]
    out = np.full(n, np.datetime64("NaT"), dtype="datetime64[ns]")
    for i, (y, m, d) in enumerate(zip(*parts, strict=True)):
        if math.isnan(y) or math.isnan(m) or math.isnan(d):
            continue
        if y != int(y) or m != int(m) or d != int(d) or not 1678 <= y <= 2261:
            raise Declined("a date part that is not a whole number within pandas' range")
        try:
            out[i] = np.datetime64(datetime.date(int(y), int(m), int(d)), "ns")
        except ValueError:  # 31 February: pandas' errors="coerce" gives NaT
            continue
    return _Col("time", out)


def _date_part(name: str, value: _Col) -> _Col:
    if value.kind != "time":
        raise Declined(f"{name} of a {value.kind}")
    t = np.asarray(value.values, dtype="datetime64[ns]")
    null = np.isnat(t)
    days = t.astype("datetime64[D]")
    out = {
        "day_of_week": lambda: (days.astype("int64") + 3) % 7,  # 1970-01-01 was a Thursday (3)
        "day_of_year": lambda: (days - days.astype("datetime64[Y]")).astype("int64") + 1,
        "month_of": lambda: t.astype("datetime64[M]").astype("int64") % 12 + 1,
        "year_of": lambda: t.astype("datetime64[Y]").astype("int64") + 1970,
        "hour_of": lambda: (t - days).astype("timedelta64[h]").astype("int64"),
    }[name]().astype("float64")
    out[null] = np.nan
    return _Col("int", out)


def _fullmatch(value: _Col, pattern: _Col) -> _Col:
    value = value.full()
    if value.kind != "str" or pattern.kind != "str" or np.ndim(pattern.values):
        raise Declined("fullmatch() of non-text")
    compiled = re.compile(pattern.values)
    return _Col("bool", np.array([compiled.fullmatch(v) is not None for v in value.values], dtype=bool))


def _call(name: str, args: list[_Col], n: int) -> _Col:
    if name == "date" and len(args) == 3:
        return _date(*args, n)
    if name in _DATE_PARTS and len(args) == 1:
        return _date_part(name, args[0])
    if name == "hhmm_to_minutes" and len(args) == 1:  # (v // 100) * 60 + v % 100, as in FUNCTIONS
        v, hundred = args[0], _const(100)
        hours = _arith(ast.Mult, _arith(ast.FloorDiv, v, hundred), _const(60))
        return _arith(ast.Add, hours, _arith(ast.Mod, v, hundred))
    if name in ("log1p", "log", "sqrt", "abs") and len(args) == 1 and args[0].kind in _NUMERIC:
        with np.errstate(all="ignore"):
            out = getattr(np, name)(np.asarray(args[0].values, dtype="float64"))
        return _num(out, args[0].kind if name == "abs" else "num")
    if name in ("isnull", "notnull") and len(args) == 1:
        null = args[0].null()
        return _Col("bool", null if name == "isnull" else ~null)
    if name == "between" and len(args) == 3:
        v, lo, hi = args
        return _logical(_compare(ast.GtE, v, lo), _compare(ast.LtE, v, hi), both=True)
    if name == "fullmatch" and len(args) == 2:
        return _fullmatch(*args)
    raise Declined(f"function {name}()")  # where, hours, days: the Featurizer computes those


def _evaluate(node: ast.AST, cols: dict[str, _Col], n: int) -> _Col:
    """An :class:`conveyor.tasks.spec.Expression`'s tree over numpy columns (its vocabulary, checked)."""
    if isinstance(node, ast.Name):
        if node.id not in cols:
            raise Declined(f"no column {node.id}")
        return cols[node.id]
    if isinstance(node, ast.Constant):
        return _const(node.value)
    if isinstance(node, ast.BinOp):
        left, right = _evaluate(node.left, cols, n), _evaluate(node.right, cols, n)
        if isinstance(node.op, ast.BitAnd | ast.BitOr):
            return _logical(left, right, both=isinstance(node.op, ast.BitAnd))
        return _arith(type(node.op), left, right)
    if isinstance(node, ast.UnaryOp):
        value = _evaluate(node.operand, cols, n)
        if isinstance(node.op, ast.USub) and value.kind in _NUMERIC:
            return _Col(value.kind, -value.values)
        if isinstance(node.op, ast.Invert) and value.kind == "bool":
            return _Col("bool", ~value.values)
        raise Declined("unary operator")
    if isinstance(node, ast.Compare):
        left, out = _evaluate(node.left, cols, n), None
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            right = _evaluate(right_node, cols, n)
            part = _compare(type(op), left, right)
            out = part if out is None else _logical(out, part, both=True)
            left = right
        assert out is not None
        return out
    if isinstance(node, ast.BoolOp):
        values = [_evaluate(v, cols, n) for v in node.values]
        out = values[0]
        for v in values[1:]:
            out = _logical(out, v, both=isinstance(node.op, ast.And))
        return out
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        return _call(node.func.id, [_evaluate(a, cols, n) for a in node.args], n)
    raise Declined(type(node).__name__)


def _broadcast(col: _Col, n: int) -> _Col:
    return col if np.ndim(col.values) else _Col(col.kind, np.full(n, col.values))


def _typed_value(value: Any, kind: str, na: frozenset[str]) -> Any:
    """A JSON value as ingest would type ``str(value)``, for the values whose parse is beyond doubt."""
    if value is None:
        return None
    if kind == "str":
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise Declined("text field")
        text = value if isinstance(value, str) else str(value)
        if not text or text != text.strip() or text in na:
            raise Declined("text that ingest strips or reads as no value")
        text.encode("utf-8")  # a lone surrogate raises UnicodeEncodeError (a ValueError): declined below
        return text
    if kind in ("int", "float") and type(value) is int:
        if abs(value) >= _EXACT_INT:
            raise Declined("an integer past float64's exact range")
        return float(value)
    if kind == "float" and type(value) is float and math.isfinite(value):
        return value
    if kind == "int" and isinstance(value, str) and _INT_TEXT.fullmatch(value):
        return float(int(value))
    if kind == "float" and isinstance(value, str) and _FLOAT_TEXT.fullmatch(value):
        return float(value)
    if kind == "timestamp" and isinstance(value, str):
        match = _TIMESTAMP_TEXT.fullmatch(value)
        if match:
            parts = [int(p) for p in match.groups()[:6]]
            return np.datetime64(datetime.datetime(*parts), "ns")  # out of range: ValueError, declined
    raise Declined(f"a {type(value).__name__} for a {kind} field")


def _lookup_column(series: pd.Series) -> _Col:
    """A lookup table's column as a numpy column of the kind the joined pandas column has."""
    dtype = series.dtype
    if pd.api.types.is_bool_dtype(dtype):
        raise Declined("boolean lookup column")
    if pd.api.types.is_integer_dtype(dtype):
        return _Col("int", series.astype("Float64").to_numpy(dtype="float64", na_value=np.nan))
    if pd.api.types.is_float_dtype(dtype):
        return _Col("num", series.to_numpy(dtype="float64", na_value=np.nan))
    if pd.api.types.is_datetime64_any_dtype(dtype):
        stamps = pd.DatetimeIndex(series)
        stamps = stamps.tz_convert("UTC").tz_localize(None) if stamps.tz is not None else stamps
        return _Col("time", stamps.as_unit("ns").to_numpy())
    values = series.astype("object").where(series.notna(), None).to_numpy()
    if not all(v is None or isinstance(v, str) for v in values):
        raise Declined("lookup column of mixed values")
    return _Col("str", values)


def _key(col: _Col) -> list[Any]:
    """Join-key values that hash equal where pandas' merge matches them: numbers as floats, and every
    null as None (merge matches a null key to a null key)."""
    null = col.null()
    values = col.values.astype("int64").tolist() if col.kind == "time" else list(col.values)
    return [None if missing else v for v, missing in zip(values, null.tolist(), strict=True)]


def _key_family(kind: str) -> str:
    return "number" if kind in _NUMERIC else kind


@dataclass(frozen=True)
class _IndexedJoin:
    """One exact spec join, its lookup table indexed by key once per loaded model."""

    left: list[str]
    key_families: list[str]
    quarantine: str  # the reason for a row with no match, "" where a miss is a null
    index: dict[tuple, int]
    added: dict[str, _Col]  # main-table name -> the lookup's column


class FastEncoder:
    """Raw rows -> the model's float32 feature matrix, evaluating the Featurizer's spec over numpy.

    Built once per loaded model; :meth:`encode` returns None where it declines (see above).
    """

    def __init__(self, featurizer: Featurizer, features: list[str], categories: dict[str, list[str]]):
        self.featurizer, self.features = featurizer, list(features)
        self.codes = {c: {level: float(i) for i, level in enumerate(v)} for c, v in categories.items()}
        loaded, spec = featurizer.loaded, featurizer.loaded.spec
        self.problem = ""  # why this spec is always declined ("" when it is not)
        try:
            if spec.hooks:
                raise Declined("hooks are Python over the frame")
            self.na = frozenset((*NA_TOKENS, *featurizer.raw_schema.na_values))
            kinds = {"int": "int", "float": "num", "str": "str", "timestamp": "time"}
            self.raw = [(c.name, c.kind, kinds.get(c.kind)) for c in featurizer.raw_schema.columns]
            if any(k is None for _, _, k in self.raw):
                raise Declined("a raw column of a kind typed by the Featurizer only")
            self.absent = {  # label and forbidden columns: null at prediction time, as featurize_full adds
                c: "str" if k == "str" else "num"
                for c, k in spec.sources[spec.main].columns.items()
                if c not in featurizer.raw_schema.names
            }
            self.prepare = [(name, Expression(text).tree) for name, text in spec.prepare.items()]
            self.derived = [(name, Expression(text).tree) for name, text in spec.derived.items()]
            self.joins = [
                self._index(j, lk) for j, lk in zip(spec.joins, featurizer.lookups.joins, strict=True)
            ]
            self.rules = [r for r in spec.rules if not _is_label_rule(r, loaded.label_columns)]
            self.trees = {
                id(r): Expression(r.expression or "").tree for r in self.rules if r.check == "expression"
            }
            for rule in self.rules:
                if rule.check == "unique" and featurizer.lookups.repeated.get(rule.column or ""):
                    raise Declined("a unique rule with repeated values")
        except Declined as why:
            self.problem = str(why)

    def _index(self, join: Any, lookup: pd.DataFrame) -> _IndexedJoin:
        if join.how != "exact":
            raise Declined("as-of joins")
        right = list(join.by.values())
        keys = [_lookup_column(lookup[c]) for c in right]
        index: dict[tuple, int] = {}
        for i, key in enumerate(zip(*(_key(k) for k in keys), strict=True)):
            index.setdefault(key, i)  # the table is deduplicated on its keys already
        added = {c: _lookup_column(lookup[c]) for c in lookup.columns if c not in right}
        reason = f"no {join.table} row matches {', '.join(join.by)}" if join.missing == "quarantine" else ""
        return _IndexedJoin(list(join.by), [_key_family(k.kind) for k in keys], reason, index, added)

    def _typed(self, rows: list[dict[str, Any]]) -> dict[str, _Col]:
        n, cols = len(rows), {}
        for name, kind in self.absent.items():
            cols[name] = (
                _Col("str", np.full(n, None, dtype="object"))
                if kind == "str"
                else _Col(kind, np.full(n, np.nan))
            )
        for name, kind, col_kind in self.raw:
            values = [_typed_value(r.get(name), kind, self.na) for r in rows]
            if col_kind == "str":
                cols[name] = _Col("str", np.array(values, dtype="object"))
            elif col_kind == "time":
                cols[name] = _Col(
                    "time", np.array([np.datetime64("NaT") if v is None else v for v in values], "M8[ns]")
                )
            else:
                cols[name] = _num(np.array([np.nan if v is None else v for v in values], "float64"), col_kind)
        return cols

    def _join(self, join: _IndexedJoin, cols: dict[str, _Col], n: int) -> np.ndarray:
        """Adds the join's columns; True per row that got a non-null value (pandas' ``notna().any``)."""
        keys = []
        for name in join.left:
            col = _broadcast(cols[name], n)
            if _key_family(col.kind) != join.key_families[len(keys)]:
                raise Declined("join keys of different kinds")  # pandas' merge refuses or casts those
            keys.append(_key(col))
        found = np.array([join.index.get(k, -1) for k in zip(*keys, strict=True)], dtype="int64")
        hit = np.zeros(n, dtype=bool)
        for name, col in join.added.items():
            if _key_family(col.kind) not in ("number", "str", "time"):
                raise Declined("lookup column kind")
            taken = col.values[np.maximum(found, 0)] if len(col.values) else np.empty(n, col.values.dtype)
            miss = found < 0
            if col.kind == "str":
                taken = np.where(miss, None, taken)
            elif col.kind == "time":
                taken = np.where(miss, np.datetime64("NaT"), taken)
            else:
                taken = np.where(miss, np.nan, taken)
            added = _Col(col.kind, taken)
            hit |= ~added.null()
            cols[name] = added
        return hit

    def encode(self, rows: list[dict[str, Any]]) -> tuple[np.ndarray, list[RowProblem]] | None:
        """(float32 features, one row each; the rows that would be quarantined and why), or None.

        The rows have passed :func:`request_problems`.
        """
        if self.problem:
            return None
        try:
            return self._encode(rows)
        except (Declined, ValueError, OverflowError, TypeError, KeyError):  # a value numpy refuses
            return None

    def _encode(self, rows: list[dict[str, Any]]) -> tuple[np.ndarray, list[RowProblem]]:
        n = len(rows)
        cols = self._typed(rows)
        for name, tree in self.prepare:
            cols[name] = _broadcast(_evaluate(tree, cols, n), n)
        reasons: list[str | None] = [None] * n
        no_match: list[str | None] = [None] * n
        for join in self.joins:
            hit = self._join(join, cols, n)
            if join.quarantine:
                for i in np.flatnonzero(~hit):
                    no_match[i] = no_match[i] or join.quarantine
        for name, tree in self.derived:
            cols[name] = _broadcast(_evaluate(tree, cols, n), n)
        spec = self.featurizer.loaded.spec
        for col in spec.required:
            if col not in cols:
                raise Declined(f"no column {col}")
            self._mark(reasons, cols[col].null(), f"{col} is missing")
        for rule in self.rules:
            self._mark(reasons, ~self._passes(rule, cols, n), rule.describe())
        reasons = [r or m for r, m in zip(reasons, no_match, strict=True)]
        out = np.empty((n, len(self.features)), dtype="float32")
        for j, name in enumerate(self.features):
            out[:, j] = self._feature(name, cols, n)
        problems = [
            RowProblem(i, _field_of(self.featurizer, why), f"row would be quarantined: {why}")
            for i, why in enumerate(reasons)
            if why is not None
        ]
        return out, problems

    @staticmethod
    def _mark(reasons: list[str | None], broken: np.ndarray, why: str) -> None:
        for i in np.flatnonzero(broken):
            if reasons[i] is None:
                reasons[i] = why

    def _passes(self, rule: Any, cols: dict[str, _Col], n: int) -> np.ndarray:
        """clean._passes over numpy: True where the row satisfies ``rule`` (a null passes but not_null)."""
        if rule.check == "expression":
            result = _broadcast(_evaluate(self.trees[id(rule)], cols, n), n)
            if result.kind != "bool":
                raise Declined("an expression rule that is not a condition")
            return result.values
        if rule.column not in cols:
            raise Declined(f"no column {rule.column}")
        v = cols[rule.column]
        null = v.null()
        if rule.check == "not_null":
            return ~null
        if rule.check == "unique":
            return np.ones(n, dtype=bool)  # no repeated values at inference (checked at build)
        values, numeric, text = v.values, v.kind in _NUMERIC, v.kind == "str"
        lo, hi, x = rule.min_value, rule.max_value, rule.value
        with np.errstate(invalid="ignore"):
            if rule.check == "in_range" and numeric:
                out = (values >= (lo if lo is not None else -np.inf)) & (
                    values <= (hi if hi is not None else np.inf)
                )
            elif rule.check in ("isin", "notin") and (numeric or text):
                allowed = rule.values or []
                if any(
                    isinstance(a, bool) or not isinstance(a, str if text else int | float) for a in allowed
                ):
                    raise Declined("isin values of another type")
                members = set(allowed)
                out = np.array([a in members for a in values], dtype=bool)
                out = ~out if rule.check == "notin" else out
            elif rule.check == "str_matches" and text:
                pattern = re.compile(rule.pattern or "")
                out = np.array(
                    [a is not None and pattern.fullmatch(a) is not None for a in values], dtype=bool
                )
            elif rule.check == "str_length" and text:
                lengths = np.array([np.nan if a is None else len(a) for a in values], dtype="float64")
                out = (lengths >= (lo or 0)) & (lengths <= (hi if hi is not None else np.inf))
            elif (
                rule.check in _ORDER_CHECKS
                and numeric
                and isinstance(x, int | float)
                and not isinstance(x, bool)
            ):
                out = _ORDER_CHECKS[rule.check](values, x)
            elif rule.check == "in_table" and (text or v.kind == "int"):
                members = self.featurizer.lookups.members[f"{rule.table}.{rule.table_column}"]
                as_text = values if text else [None if a != a else str(int(a)) for a in values]
                out = np.array([a is not None and a in members for a in as_text], dtype=bool)
            else:
                raise Declined(f"rule {rule.check} on a {v.kind} column")
        return np.asarray(out, dtype=bool) | null

    def _feature(self, name: str, cols: dict[str, _Col], n: int) -> np.ndarray:
        if name not in cols:
            raise Declined(f"no column {name}")
        col = _broadcast(cols[name], n)
        if name in self.codes:
            codes = self.codes[name]
            if col.kind == "str":
                return np.array([codes.get(v, np.nan) for v in col.values], dtype="float32")
            if col.kind == "int":
                return np.array(
                    [np.nan if v != v else codes.get(str(int(v)), np.nan) for v in col.values],
                    dtype="float32",
                )
            raise Declined(f"categorical {name} from a {col.kind} column")
        if col.kind in _NUMERIC:
            return col.values.astype("float32")
        if col.kind == "bool":
            return col.values.astype("float32")
        raise Declined(f"numeric feature {name} from a {col.kind} column")


_ORDER_CHECKS = {
    "greater_than": np.greater,
    "greater_than_or_equal_to": np.greater_equal,
    "less_than": np.less,
    "less_than_or_equal_to": np.less_equal,
    "equal_to": np.equal,
    "not_equal_to": np.not_equal,
}
