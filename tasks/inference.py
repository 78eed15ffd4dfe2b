"""Raw, unlabelled rows -> the model's features: the spec's own code, in inference mode.

Training, batch scoring and serving compute features with one code path
(``conveyor.tasks.clean``): the same typing as ingest, the same rules (label
rules skipped), the same lookup joins against the lookup tables committed with
the model's training data, the same derived columns. Only the label is absent.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import pandas as pd

from conveyor.store.storage import Store, open_manifest
from conveyor.tasks.clean import (
    Lookups,
    features_of,
    lookups_from,
    prepare,
    quarantine_reasons,
    reasons_for,
)
from conveyor.tasks.ingest import REASON, type_partition
from conveyor.tasks.schema import TableSchema
from conveyor.tasks.spec import LoadedSpec, PipelineSpec, SilverSchema


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
        write = {
            "write_index": False,
            "storage_options": store.options,
            "compute": False,
            "write_metadata_file": False,
            "name_function": lambda i: f"part-{i:05d}.parquet",
        }
        dask.compute(scored.to_parquet(out_url, **write), rejected.to_parquet(q_url, **write))
        lineage = {
            "input": {"url": url, "fingerprint": fingerprint},
            "model": {"name": model, "version": loaded.version},
            "spec_version": featurizer.schema.spec_version,
            "lookups": featurizer.lookup_versions,
        }
        q_done = commit_dataset(store, name, out_version, q_url, lineage | {"of": name})
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


def featurize_rows(
    featurizer: Featurizer, rows: list[dict[str, Any]]
) -> tuple[pd.DataFrame, list[RowProblem]]:
    """Raw request rows -> the time key and features; a row that would be quarantined is a problem naming
    the rule (the caller answers 422). Unknown fields are refused; a missing optional field is null."""
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
            field = next((c for c in featurizer.raw_schema.names if str(why).startswith(c)), "*")
            problems.append(RowProblem(int(i), field, f"row would be quarantined: {why}"))
    return features, problems
