"""Monitoring checks: data quality of each clean run and the model against its champion.

Pure logic (no orchestration): a profile of a silver version (rows, null rate
per column, binned distributions), and checks of a profile against thresholds
and a reference profile (the previous silver version, the champion's training
data). Profiles are stored as JSON under ``<root>/monitoring/<dataset>/<version>/``
so the next run has something to compare against without re-reading old data.

A committed version is profiled part by part (:func:`profile_dataset`): each
partition is reduced to counts on the workers (nulls, values per bin, values
per category), so memory is bounded by a partition whatever the data size.
New bin edges are quantiles of all values up to :data:`EDGE_SAMPLE_ROWS` rows,
of a seeded sample of that many above.
"""

from __future__ import annotations

import math
import posixpath
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from conveyor.store.storage import Store, exists, open_manifest, read_dataset, read_json, write_json_atomic

PROFILE = "profile.json"
LATEST = "latest.json"
BINS = 10
EPS = 1e-4  # PSI floor for empty bins, the usual choice
OTHER = "__other__"
EDGE_SAMPLE_ROWS = 1_000_000  # rows whose values set new bin edges (all rows of a smaller dataset)


@dataclass(frozen=True)
class Thresholds:
    """Every monitoring threshold, with its default (flows/params.py exposes them as the run form)."""

    max_row_change: float = 0.5  # |rows - previous rows| / previous rows
    max_null_rate: float = 0.25  # share of nulls in any column ...
    null_rate_limits: dict[str, float] = field(
        default_factory=lambda: {"wind_gust": 0.85}
    )  # ... unless listed here
    max_quarantine_share: float = 0.10  # quarantined / rows in
    max_psi: float = 0.25  # population stability index per feature (0.1 moderate, 0.25 significant shift)
    max_metric_drop: float = 0.01  # how much worse than the champion's the challenger's holdout metric may be
    metric: str = "roc_auc"  # a metric the task lacks (roc_auc of a regression) means the task's gate metric


@dataclass(frozen=True)
class Check:
    name: str  # e.g. "null_rate:wind_gust", "psi:distance", "row_change"
    value: float
    threshold: float
    breached: bool
    detail: str = ""


@dataclass(frozen=True)
class MonitorReport:
    subject: str  # "silver_flights <version>" or "flights_late <version>"
    checks: list[Check]

    @property
    def breaches(self) -> list[Check]:
        return [c for c in self.checks if c.breached]

    def to_rows(self) -> list[dict[str, Any]]:
        return [asdict(c) for c in self.checks]


@dataclass(frozen=True)
class ColumnProfile:
    kind: str  # "numeric" or "categorical"
    null_rate: float
    edges: list[float] = field(default_factory=list)  # numeric: inner quantile edges
    shares: list[float] = field(default_factory=list)  # numeric: share per bin (len(edges) + 1)
    categories: dict[str, float] = field(default_factory=dict)  # categorical: share per value


@dataclass(frozen=True)
class DataProfile:
    dataset: str
    version: str
    rows: int
    rows_in: int
    quarantined: int
    columns: dict[str, ColumnProfile]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DataProfile:
        data = dict(data)
        data["columns"] = {k: ColumnProfile(**v) for k, v in data["columns"].items()}
        return cls(**data)


# --- profiles -----------------------------------------------------------------------------


def _is_numeric(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


def _bin_shares(values: np.ndarray, edges: list[float]) -> list[float]:
    counts = np.bincount(np.searchsorted(np.asarray(edges), values, side="right"), minlength=len(edges) + 1)
    total = counts.sum()
    return (counts / total).tolist() if total else [0.0] * (len(edges) + 1)


def profile_frame(
    frame: pd.DataFrame,
    dataset: str,
    version: str,
    rows_in: int,
    quarantined: int,
    columns: list[str],
    reference: DataProfile | None = None,
) -> DataProfile:
    """Profile ``columns`` of ``frame``; numeric bins reuse the reference's edges so PSI compares like with
    like."""
    profiles: dict[str, ColumnProfile] = {}
    for col in columns:
        series = frame[col]
        null_rate = float(series.isna().mean()) if len(series) else 0.0
        present = series.dropna()
        ref = reference.columns.get(col) if reference else None
        if _is_numeric(series):
            values = present.to_numpy(dtype="float64")
            if ref is not None and ref.kind == "numeric":
                edges = ref.edges
            else:
                qs = np.quantile(values, np.linspace(0, 1, BINS + 1)[1:-1]) if len(values) else np.array([])
                edges = sorted({float(q) for q in qs})
            profiles[col] = ColumnProfile(
                "numeric", null_rate, edges=list(edges), shares=_bin_shares(values, edges)
            )
        else:
            shares = present.astype(str).value_counts(normalize=True)
            profiles[col] = ColumnProfile(
                "categorical", null_rate, categories={str(k): float(v) for k, v in shares.items()}
            )
    return DataProfile(dataset, version, int(len(frame)), int(rows_in), int(quarantined), profiles)


def _part_sample(part: pd.DataFrame, columns: list[str], keep: float, seed: int) -> dict[str, np.ndarray]:
    """The present values of numeric ``columns`` in one partition, each row kept with chance ``keep``."""
    rows = np.random.default_rng(seed).random(len(part)) < keep if keep < 1 else None
    out = {}
    for col in columns:
        values = part[col] if rows is None else part[col][rows]
        out[col] = values.dropna().to_numpy(dtype="float64")
    return out


def _part_counts(
    part: pd.DataFrame, columns: list[str], edges: dict[str, list[float]]
) -> tuple[int, dict[str, int], dict[str, Any]]:
    """One partition as counts: its rows, nulls per column, values per bin (numeric) or per category."""
    nulls, counts = {}, {}
    for col in columns:
        series = part[col]
        nulls[col] = int(series.isna().sum())
        present = series.dropna()
        if col in edges:
            counts[col] = np.bincount(
                np.searchsorted(np.asarray(edges[col]), present.to_numpy(dtype="float64"), side="right"),
                minlength=len(edges[col]) + 1,
            )
        else:
            counts[col] = present.astype(str).value_counts()
    return len(part), nulls, counts


def profile_dataset(
    store: Store,
    url: str,
    dataset: str,
    version: str,
    rows_in: int,
    quarantined: int,
    columns: list[str],
    reference: DataProfile | None = None,
) -> DataProfile:
    """Profile a committed version partition by partition through Dask (the default client, if any).

    The same profile as :func:`profile_frame` of the whole frame: the counts
    add up, and new bin edges are quantiles of every value while the data has
    at most :data:`EDGE_SAMPLE_ROWS` rows.
    """
    import dask

    frame = read_dataset(store, url, columns=columns)
    numeric = [c for c in columns if _is_numeric(frame._meta[c])]
    edges: dict[str, list[float]] = {}
    for col in numeric:
        ref = reference.columns.get(col) if reference else None
        if ref is not None and ref.kind == "numeric":
            edges[col] = list(ref.edges)
    unbinned = [c for c in numeric if c not in edges]
    parts = frame.to_delayed()
    if unbinned:
        keep = min(1.0, EDGE_SAMPLE_ROWS / max(open_manifest(store, url).rows, 1))
        sample = dask.delayed(_part_sample)
        samples = dask.compute(*(sample(p, unbinned, keep, i) for i, p in enumerate(parts)))
        for col in unbinned:
            values = np.concatenate([s[col] for s in samples])
            qs = np.quantile(values, np.linspace(0, 1, BINS + 1)[1:-1]) if len(values) else np.array([])
            edges[col] = sorted({float(q) for q in qs})
        del samples
    count = dask.delayed(_part_counts)
    counted = dask.compute(*(count(p, columns, edges) for p in parts))
    rows = sum(c[0] for c in counted)
    profiles: dict[str, ColumnProfile] = {}
    for col in columns:
        nulls = sum(c[1][col] for c in counted)
        null_rate = float(nulls / rows) if rows else 0.0
        if col in edges:
            bins = np.sum([c[2][col] for c in counted], axis=0)
            total = bins.sum()
            shares = (bins / total).tolist() if total else [0.0] * (len(edges[col]) + 1)
            profiles[col] = ColumnProfile("numeric", null_rate, edges=list(edges[col]), shares=shares)
        else:
            values = pd.concat([c[2][col] for c in counted]).groupby(level=0).sum()
            values = values.sort_values(ascending=False, kind="stable")
            total = values.sum()
            shares = {str(k): float(v / total) for k, v in values.items()} if total else {}
            profiles[col] = ColumnProfile("categorical", null_rate, categories=shares)
    return DataProfile(dataset, version, int(rows), int(rows_in), int(quarantined), profiles)


def psi(expected: list[float], actual: list[float]) -> float:
    """Population stability index of two share vectors over the same bins."""
    total = 0.0
    for e, a in zip(expected, actual, strict=False):
        e, a = max(e, EPS), max(a, EPS)
        total += (a - e) * math.log(a / e)
    return float(total)


def column_psi(reference: ColumnProfile, current: ColumnProfile) -> float:
    if reference.kind == "numeric" and current.kind == "numeric" and reference.edges == current.edges:
        return psi(reference.shares, current.shares)
    keys = sorted(set(reference.categories) | set(current.categories))
    return psi(
        [reference.categories.get(k, 0.0) for k in keys], [current.categories.get(k, 0.0) for k in keys]
    )


# --- checks -------------------------------------------------------------------------------


def check_data(
    current: DataProfile,
    thresholds: Thresholds,
    previous: DataProfile | None = None,
    training: DataProfile | None = None,
) -> MonitorReport:
    """Row change vs the previous version, null rates, quarantine share, drift vs the training data."""
    checks: list[Check] = []
    if previous is not None and previous.rows > 0:
        change = abs(current.rows - previous.rows) / previous.rows
        checks.append(
            Check(
                "row_change",
                round(change, 6),
                thresholds.max_row_change,
                change > thresholds.max_row_change,
                f"{previous.rows:,} rows in {previous.version} -> {current.rows:,} in {current.version}",
            )
        )
    for col, prof in current.columns.items():
        limit = thresholds.null_rate_limits.get(col, thresholds.max_null_rate)
        checks.append(Check(f"null_rate:{col}", round(prof.null_rate, 6), limit, prof.null_rate > limit))
    share = current.quarantined / current.rows_in if current.rows_in else 0.0
    checks.append(
        Check(
            "quarantine_share",
            round(share, 6),
            thresholds.max_quarantine_share,
            share > thresholds.max_quarantine_share,
            f"{current.quarantined:,} of {current.rows_in:,} rows",
        )
    )
    if training is not None:
        for col, prof in current.columns.items():
            ref = training.columns.get(col)
            if ref is None:
                continue
            value = column_psi(ref, prof)
            checks.append(
                Check(
                    f"psi:{col}",
                    round(value, 6),
                    thresholds.max_psi,
                    value > thresholds.max_psi,
                    f"vs training data {training.dataset} {training.version}",
                )
            )
    return MonitorReport(f"{current.dataset} {current.version}", checks)


def check_model(
    model: str,
    version: str,
    metrics: dict[str, float],
    champion_metrics: dict[str, float] | None,
    champion_version: str | None,
    thresholds: Thresholds,
    gate_metric: str | None = None,
) -> MonitorReport:
    """The challenger's holdout metric against the champion's on the same holdout.

    The metric is ``thresholds.metric`` when the task has it, else ``gate_metric``
    (the spec's): a regression has no ROC AUC to watch.
    """
    from conveyor.tasks.evaluate import improvement

    checks: list[Check] = []
    metric = thresholds.metric if thresholds.metric in metrics or gate_metric is None else gate_metric
    if champion_metrics is not None and metric in champion_metrics and metric in metrics:
        drop = -improvement(metric, metrics[metric], champion_metrics[metric])
        checks.append(
            Check(
                f"metric_drop:{metric}",
                round(drop, 6),
                thresholds.max_metric_drop,
                drop > thresholds.max_metric_drop,
                f"{model} {version}: {metrics[metric]:.4f} "
                f"vs champion {champion_version}: {champion_metrics[metric]:.4f}",
            )
        )
    return MonitorReport(f"{model} {version}", checks)


# --- stored profiles ----------------------------------------------------------------------


def profile_url(store: Store, dataset: str, version: str) -> str:
    return store.url("monitoring", dataset, version, PROFILE)


def save_profile(store: Store, profile: DataProfile, latest: bool = True) -> str:
    """Store ``profile`` (and, by default, mark it as the latest one checked)."""
    url = profile_url(store, profile.dataset, profile.version)
    write_json_atomic(store, url, asdict(profile))
    if latest:
        write_json_atomic(
            store, store.url("monitoring", profile.dataset, LATEST), {"version": profile.version}
        )
    return url


def load_profile(store: Store, dataset: str, version: str) -> DataProfile | None:
    url = profile_url(store, dataset, version)
    return DataProfile.from_json(read_json(store, url)) if exists(store, url) else None


def latest_profile(store: Store, dataset: str) -> DataProfile | None:
    """The profile of the last version checked (the "last silver version")."""
    pointer = store.url("monitoring", dataset, LATEST)
    if not exists(store, pointer):
        return None
    return load_profile(store, dataset, read_json(store, pointer)["version"])


def training_profile(store: Store, dataset: str, version: str, columns: list[str]) -> DataProfile | None:
    """The stored profile of the data a model was trained on; profiled now if still committed but never
    profiled."""
    found = load_profile(store, dataset, version)
    if found is not None:
        return found
    url = store.dataset_url(dataset, version)
    if not exists(store, posixpath.join(url, "_manifest.json")):
        return None
    manifest = open_manifest(store, url)
    prof = profile_dataset(store, url, dataset, version, manifest.rows, 0, columns)
    save_profile(store, prof, latest=False)
    return prof
