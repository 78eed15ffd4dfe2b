"""Clean: the bronze tables of a spec -> validated, de-duplicated, joined silver features.

What a row must satisfy, how the lookup tables join, which columns are
derived, the label and the features all come from the pipeline spec
(tasks/spec.py); this module only carries them out, partition by partition.
A row that breaks a rule goes to quarantine with the rule's reason, an exact
duplicate goes there as a duplicate, and ``rows_in == rows_out +
rows_quarantined`` is checked before the silver version is committed. The
silver manifest carries the :class:`SilverSchema`: all any later stage knows.

The same code scores unlabelled rows (``inference=True``): label rules are
skipped, every other rule still quarantines, and joins and derived columns
are computed exactly as in training.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dask
import numpy as np
import pandas as pd

from conveyor.settings import DEFAULT_SPEC
from conveyor.store.storage import (
    DatasetRef,
    Manifest,
    StorageError,
    Store,
    clear_version,
    code_version,
    commit_dataset,
    committed,
    content_version,
    open_manifest,
    parquet_write_options,
    read_dataset,
    read_dataset_pandas,
)
from conveyor.tasks.ingest import REASON, IngestResult
from conveyor.tasks.spec import (
    DEFAULT_GATE,
    FOLD,
    Expression,
    JoinSpec,
    LoadedSpec,
    RuleSpec,
    SilverSchema,
    load_spec,
    split_params,
)

if TYPE_CHECKING:
    import dask.dataframe as dd

DUPLICATE = "exact duplicate of an earlier row"
REASONS_KEY = "quarantine_reasons"  # rows per reason, in the quarantine manifest's extra


@dataclass(frozen=True)
class Lookups:
    """The lookup tables, small enough to broadcast to every partition."""

    joins: list[pd.DataFrame]  # one per spec join: its keys and the columns it adds, deduplicated
    members: dict[str, frozenset]  # "table.column" -> the values an in_table rule accepts
    repeated: dict[str, frozenset] = dataclasses.field(default_factory=dict)  # unique rules: repeated values
    classes: tuple[str, ...] = ()  # multiclass: the label's classes


@dataclass(frozen=True)
class CleanResult:
    silver: DatasetRef
    quarantine: DatasetRef
    rows_in: int
    quarantine_reasons: dict[str, int]
    schema: SilverSchema
    reused: bool = False  # found committed from an earlier run, not recomputed

    @property
    def features(self) -> list[str]:
        return list(self.schema.features)

    @property
    def categories(self) -> dict[str, list[str]]:
        return self.schema.categories


# --- one partition: rules, joins, derived columns, label ---------------------------------------


def _is_label_rule(rule: RuleSpec, label_columns: list[str]) -> bool:
    if rule.label_rule is not None:
        return rule.label_rule
    if rule.check == "expression":
        return bool(set(Expression(rule.expression or "").columns) & set(label_columns))
    return rule.column in label_columns


def _passes(rule: RuleSpec, frame: pd.DataFrame, lookups: Lookups) -> pd.Series:
    """True where the row satisfies ``rule`` (a null value passes every check but not_null, like pandera)."""
    if rule.check == "expression":
        return pd.Series(Expression(rule.expression or "").evaluate(frame), index=frame.index)
    v = frame[rule.column]
    lo, hi, x = rule.min_value, rule.max_value, rule.value
    out = {
        "not_null": lambda: v.notna(),
        "in_range": lambda: v.between(lo if lo is not None else -np.inf, hi if hi is not None else np.inf),
        "isin": lambda: v.isin(rule.values or []),
        "notin": lambda: ~v.isin(rule.values or []),
        "str_matches": lambda: v.astype("string").str.fullmatch(rule.pattern or ""),
        "str_length": lambda: v.astype("string").str.len().between(lo or 0, hi if hi is not None else np.inf),
        "greater_than": lambda: v > x,
        "greater_than_or_equal_to": lambda: v >= x,
        "less_than": lambda: v < x,
        "less_than_or_equal_to": lambda: v <= x,
        "equal_to": lambda: v == x,
        "not_equal_to": lambda: v != x,
        "in_table": lambda: v.astype("string").isin(lookups.members[f"{rule.table}.{rule.table_column}"]),
        "unique": lambda: ~v.isin(lookups.repeated.get(rule.column, frozenset())),
    }[rule.check]()
    if rule.check != "not_null":  # pandera's default: a null passes the check (not_null says otherwise)
        out = out.fillna(False).astype(bool) | v.isna()
    return out.fillna(False).astype(bool)


def _join(frame: pd.DataFrame, join: JoinSpec, lookup: pd.DataFrame) -> pd.DataFrame:
    """Left join keeping the frame's rows and order; as-of joins take the latest match at or before."""
    left_on, right_on = list(join.by), list(join.by.values())
    if join.how == "exact":
        keyed = lookup.rename(columns=dict(zip(right_on, left_on, strict=True)))
        merged = frame[left_on].merge(keyed, how="left", on=left_on)
        merged.index = frame.index
        return merged.drop(columns=left_on)
    ((t_left, t_right),) = (join.asof or {}).items()
    keyed = lookup.rename(columns=dict(zip(right_on, left_on, strict=True)) | {t_right: t_left})
    keyed = keyed.dropna(subset=[t_left]).sort_values(t_left)
    left = frame[[*left_on, t_left]].assign(_pos=np.arange(len(frame)))
    missing_time = left[t_left].isna()
    merged = pd.merge_asof(
        left[~missing_time].sort_values(t_left),
        keyed,
        on=t_left,
        by=left_on or None,
        direction="backward",
        tolerance=pd.Timedelta(join.tolerance) if join.tolerance else None,
    )
    out = pd.concat([merged, left[missing_time]]).sort_values("_pos")
    out.index = frame.index
    return out.drop(columns=[*left_on, t_left, "_pos"])


def _with_columns(frame: pd.DataFrame, exprs: dict[str, str]) -> pd.DataFrame:
    for name, text in exprs.items():
        value = Expression(text).evaluate(frame)
        frame[name] = value if isinstance(value, pd.Series) else pd.Series(value, index=frame.index)
    return frame


def prepare(part: pd.DataFrame, loaded: LoadedSpec, lookups: Lookups) -> tuple[pd.DataFrame, pd.Series]:
    """The partition with joined and derived columns, and the first join a row failed (NA if none)."""
    spec = loaded.spec
    frame = _with_columns(part.copy(), spec.prepare)
    no_match = pd.Series(pd.NA, index=frame.index, dtype="string")
    for join, lookup in zip(spec.joins, lookups.joins, strict=True):
        added = _join(frame, join, lookup)
        if join.missing == "quarantine":
            hit = added.notna().any(axis=1)
            no_match = no_match.mask(
                no_match.isna() & ~hit, f"no {join.table} row matches {', '.join(join.by)}"
            )
        for col in added.columns:
            frame[col] = added[col]
    frame = _with_columns(frame, spec.derived)
    for hook in spec.hooks:
        module, _, name = hook.function.partition(":")
        frame = getattr(importlib.import_module(module), name)(frame)
    return frame, no_match


def reasons_for(
    frame: pd.DataFrame, no_match: pd.Series, loaded: LoadedSpec, lookups: Lookups, inference: bool = False
) -> pd.Series:
    """The first broken rule of each row (NA where the row is valid), in the spec's order."""
    spec = loaded.spec
    label_cols = loaded.label_columns
    reason = pd.Series(pd.NA, index=frame.index, dtype="string")
    for col in spec.required:
        reason = reason.mask(reason.isna() & frame[col].isna(), f"{col} is missing")
    for rule in spec.rules:
        if inference and _is_label_rule(rule, label_cols):
            continue
        reason = reason.mask(reason.isna() & ~_passes(rule, frame, lookups), rule.describe())
    reason = reason.mask(reason.isna(), no_match)
    if not inference:
        for col in label_cols:
            reason = reason.mask(reason.isna() & frame[col].isna(), f"label source {col} is missing")
        label = spec.label
        if label.task == "multiclass" and lookups.classes:
            raw = frame[label.column] if label.column else Expression(label.expression or "").evaluate(frame)
            known = pd.Series(raw, index=frame.index).astype("string").isin(lookups.classes).fillna(False)
            reason = reason.mask(
                reason.isna() & ~known, f"{label.name} is not one of {list(lookups.classes)}"
            )
    return reason


def label_values(frame: pd.DataFrame, loaded: LoadedSpec, classes: list[str]) -> pd.Series:
    """The label of valid rows: 0/1 (binary), a class code (multiclass) or a number (regression)."""
    label = loaded.spec.label
    raw = frame[label.column] if label.column else Expression(label.expression or "").evaluate(frame)
    if label.task == "regression":
        return pd.Series(np.asarray(raw, dtype="float64"), index=frame.index).astype("float32")
    if label.task == "binary":
        if label.positive_class is not None:
            raw = raw.astype("string") == label.positive_class
        return pd.Series(np.asarray(raw, dtype="float64") > 0, index=frame.index).astype("int8")
    codes = pd.Categorical(raw.astype("string"), categories=classes).codes
    return pd.Series(codes, index=frame.index).astype("int16")


def features_of(frame: pd.DataFrame, schema: SilverSchema) -> pd.DataFrame:
    """The time key, the row keys and the features, typed: categoricals as strings, the rest float32."""
    out = {schema.time_key: frame[schema.time_key]}
    out |= {k: frame[k] for k in schema.keys if k not in schema.features and k != schema.time_key}
    for col in schema.features:
        if col in schema.categorical:
            out[col] = frame[col].astype("string")
        else:
            out[col] = pd.to_numeric(frame[col], errors="coerce").astype("float32")
    return pd.DataFrame(out, index=frame.index)


def _mark(
    part: pd.DataFrame,
    loaded: LoadedSpec,
    lookups: Lookups,
    duplicates: set[tuple[int, int]],
    inference: bool,
    partition_info: dict | None = None,
) -> pd.DataFrame:
    pid = partition_info["number"] if partition_info else 0
    frame, no_match = prepare(part, loaded, lookups)
    reason = reasons_for(frame, no_match, loaded, lookups, inference)
    if duplicates:
        dup = pd.Series([(pid, i) in duplicates for i in range(len(part))], index=part.index)
        reason = reason.mask(reason.isna() & dup, DUPLICATE)
    return part.assign(**{REASON: reason})


def _silver_part(
    part: pd.DataFrame, loaded: LoadedSpec, lookups: Lookups, schema: SilverSchema, seed: int
) -> pd.DataFrame:
    frame, _ = prepare(part, loaded, lookups)
    out = features_of(frame, schema)
    out[schema.label] = label_values(frame, loaded, schema.classes)
    if schema.split.get("kind") == "ratio":
        h = pd.util.hash_pandas_object(part, index=False, hash_key=f"conveyor{seed:08d}"[:16]).to_numpy()
        out[FOLD] = (h % 1_000_000_007) / 1_000_000_007.0
    return out


# --- the whole table ---------------------------------------------------------------------------


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


def find_duplicates(frame: dd.DataFrame) -> set[tuple[int, int]]:
    """(partition, position) of every exact duplicate after its first occurrence."""
    hashes = frame.map_partitions(_row_hash, meta={"h": "uint64", "partition": "int64", "position": "int64"})
    with dask.config.set({"dataframe.shuffle.method": "tasks"}):
        counts = hashes["h"].value_counts(split_out=max(1, frame.npartitions // 4))
        repeated = counts[counts > 1].compute()
    if repeated.empty:
        return set()
    repeated_set = set(repeated.index.tolist())
    rows = hashes[hashes["h"].isin(repeated_set)].compute().sort_values(["h", "partition", "position"])
    later = rows[rows.duplicated("h", keep="first")]
    return set(zip(later["partition"].tolist(), later["position"].tolist(), strict=True))


def load_lookups(store: Store, loaded: LoadedSpec, ingested: IngestResult) -> Lookups:
    return lookups_from(store, loaded, {alias: t.bronze.url for alias, t in ingested.tables.items()})


def lookups_from(store: Store, loaded: LoadedSpec, bronze_urls: dict[str, str]) -> Lookups:
    """The lookup tables of the spec, read from their committed bronze versions."""
    spec = loaded.spec
    joins = []
    for join in spec.joins:
        keys = [*join.by.values(), *(join.asof or {}).values()]
        frame = read_dataset_pandas(
            store, bronze_urls[join.table], list(dict.fromkeys([*keys, *join.columns]))
        )
        if join.duplicates == "error" and frame.duplicated(keys).any():
            raise StorageError(
                f"{bronze_urls[join.table]}: duplicate keys {keys} in lookup table '{join.table}'"
            )
        frame = frame.drop_duplicates(keys, keep="last" if join.duplicates == "last" else "first")
        joins.append(frame.rename(columns=join.columns))
    members: dict[str, frozenset] = {}
    refs = [f"{r.table}.{r.table_column}" for r in spec.rules if r.check == "in_table"]
    refs += [c.levels_from for c in spec.features.categorical_specs() if c.levels_from]
    for ref in dict.fromkeys(refs):
        table, _, col = ref.partition(".")
        values = read_dataset_pandas(store, bronze_urls[table], [col])[col].dropna()
        members[ref] = frozenset(values.astype(str).unique())
    return Lookups(joins=joins, members=members)


def _classes(loaded: LoadedSpec, frame: dd.DataFrame) -> list[str]:
    """Class names: binary [negative, positive]; multiclass as listed, else every label value seen."""
    label = loaded.spec.label
    if label.task == "binary":
        return (
            ["0", "1"]
            if label.positive_class is None
            else [f"not {label.positive_class}", label.positive_class]
        )
    if label.task == "regression":
        return []
    if label.classes:
        return list(label.classes)
    if not label.column:
        raise StorageError(
            f"{loaded.where}: label.classes: list the classes of a multiclass label expression"
        )
    return sorted(map(str, frame[label.column].dropna().astype("string").unique().compute().tolist()))


def _repeated(loaded: LoadedSpec, frame: dd.DataFrame) -> dict[str, frozenset]:
    """Values that occur more than once in a column with a ``unique`` rule (global, not per partition)."""
    cols = [r.column for r in loaded.spec.rules if r.check == "unique" and r.column in frame.columns]
    counts = dask.compute({c: frame[c].value_counts() for c in cols})[0] if cols else {}
    return {c: frozenset(v[v > 1].index.tolist()) for c, v in counts.items()}


def clean(
    store: Store,
    ingested: IngestResult,
    client: Any,
    loaded: LoadedSpec | None = None,
    train_end: str = "",
    valid_end: str = "",
) -> CleanResult:
    """Validate, join, derive and label the spec's main table (default spec: the flagship)."""
    loaded = loaded or load_spec(DEFAULT_SPEC)
    spec = loaded.spec
    main_in = ingested.tables[spec.main].bronze
    split = split_params(loaded, train_end, valid_end)
    version = content_version(
        "clean",
        {k: v.bronze.version for k, v in ingested.tables.items()},
        loaded.version,
        dataclasses.asdict(split),
        code_version("clean", "spec"),
    )
    name = f"silver_{spec.name}"
    silver_url = store.dataset_url(name, version)
    q_url = store.quarantine_url(name, version)
    done, q_done = committed(store, name, version), committed(store, name, version, q_url)
    if done is not None and q_done is not None:
        return dataclasses.replace(_result(store, done, q_done, main_in.rows), reused=True)

    frame = read_dataset(store, main_in.url)
    classes = _classes(loaded, frame)
    lookups = dataclasses.replace(
        load_lookups(store, loaded, ingested),
        repeated=_repeated(loaded, frame),
        classes=tuple(classes) if spec.label.task == "multiclass" else (),
    )
    duplicates = find_duplicates(frame) if spec.duplicates == "quarantine" else set()
    marked = frame.map_partitions(
        _mark,
        loaded,
        lookups,
        duplicates,
        False,
        meta=frame._meta.assign(**{REASON: pd.Series(dtype="string")}),
    )
    categorical = [c.name for c in spec.features.categorical_specs()]
    schema = SilverSchema(
        spec=spec.name,
        spec_version=loaded.version,
        features=list(spec.features.include),
        categorical=categorical,
        categories={},
        label=spec.label.name,
        task=spec.label.task,
        classes=classes,
        time_key=spec.time,
        split=dataclasses.asdict(split),
        baseline_keys=list(spec.baseline),
        keys=list(spec.row_keys),
        gate_metric=spec.gate_metric or DEFAULT_GATE[spec.label.task],
        raw_fields={
            c: k
            for c, k in spec.sources[spec.main].columns.items()
            if c not in loaded.label_columns and c not in spec.features.forbidden
        },
    )
    valid = marked[marked[REASON].isna()].drop(columns=[REASON])
    meta = _silver_part(
        frame._meta,
        loaded,
        Lookups([lk.head(0) for lk in lookups.joins], lookups.members),
        schema,
        loaded.spec.split.seed,
    )
    silver_frame = valid.map_partitions(_silver_part, loaded, lookups, schema, spec.split.seed, meta=meta)
    rejected = marked[~marked[REASON].isna()]

    for target in (silver_url, q_url):
        clear_version(store, target)
    write = parquet_write_options(store)
    # The reasons are counted in the same pass as the writes (they share the marked partitions) and
    # kept in the quarantine's manifest: a reused clean reads them there instead of the rows.
    _, _, reason_counts = dask.compute(
        silver_frame.to_parquet(silver_url, **write),
        rejected.to_parquet(q_url, **write),
        rejected[REASON].value_counts(),
    )
    reasons = reasons_by_count(reason_counts)

    import dask.dataframe as dd  # here: a run whose stages are all reused never imports it

    parts = dd.read_parquet(silver_url, columns=categorical or None, storage_options=store.options)
    levels = dask.compute({c: parts[c].dropna().unique() for c in categorical})[0] if categorical else {}
    categories = {c: sorted(map(str, v.tolist())) for c, v in levels.items()}
    for cat in spec.features.categorical_specs():
        if cat.levels_from:
            categories[cat.name] = sorted(set(categories[cat.name]) | lookups.members[cat.levels_from])
    schema = dataclasses.replace(schema, categories=categories)
    lineage = {"bronze": {k: v.bronze.version for k, v in ingested.tables.items()}, "spec": loaded.version}
    q = commit_dataset(store, name, version, q_url, lineage | {"of": name}, extra={REASONS_KEY: reasons})
    extra = schema.to_extra() | {"spec_document": spec.model_dump(mode="json")}
    silver = commit_dataset(store, name, version, silver_url, lineage, extra=extra)
    return _result(store, silver, q, main_in.rows)


def quarantine_reasons(store: Store, quarantine: DatasetRef) -> dict[str, int]:
    """How many rows a committed quarantine version holds per reason, most frequent first."""
    if not quarantine.rows:
        return {}
    counted = reasons_in(open_manifest(store, quarantine.url), quarantine)
    if counted is not None:
        return counted
    # A version committed without its counts (or with counts that disagree with it): count the rows.
    rows = read_dataset(store, quarantine.url, columns=[REASON])
    return reasons_by_count(rows[REASON].value_counts().compute())


def reasons_in(manifest: Manifest, quarantine: DatasetRef) -> dict[str, int] | None:
    """The counts a quarantine manifest keeps, or None if it keeps none that add up to its rows."""
    counted = manifest.extra.get(REASONS_KEY)
    if not isinstance(counted, dict) or sum(counted.values()) != quarantine.rows:
        return None
    return {str(k): int(v) for k, v in counted.items()}


def reasons_by_count(counts: pd.Series) -> dict[str, int]:
    """Rows per reason, most frequent first."""
    return {str(k): int(v) for k, v in counts.sort_values(ascending=False, kind="stable").items() if v}


def _result(store: Store, silver: DatasetRef, q: DatasetRef, rows_in: int) -> CleanResult:
    if rows_in != silver.rows + q.rows:
        raise StorageError(
            f"clean lost rows: {rows_in} in, {silver.rows} silver + {q.rows} quarantined "
            f"= {silver.rows + q.rows}"
        )
    reasons = quarantine_reasons(store, q)
    schema = SilverSchema.from_extra(open_manifest(store, silver.url).extra)
    return CleanResult(
        silver=silver, quarantine=q, rows_in=rows_in, quarantine_reasons=reasons, schema=schema
    )
