"""Evaluate: the trained model, a naive baseline and the current champion on one holdout.

The decision threshold is chosen on the validation slice (max F1), never on
the holdout. The baseline is the historical late rate per carrier and
scheduled departure hour on the training slice, shrunk towards the overall
rate where a cell is thin.
"""

from __future__ import annotations

import io
import posixpath
from dataclasses import asdict, dataclass, field
from typing import Any

import dask
import numpy as np
import pandas as pd
from sklearn import metrics as skm

from conveyor.store.storage import Store, write_bytes_atomic, write_json_atomic
from conveyor.tasks.clean import LABEL, CleanResult
from conveyor.tasks.train import (
    SplitParams,
    TrainResult,
    categorize,
    importance,
    load_booster,
    load_split,
    predict_dask,
)

BASELINE_KEYS = ("carrier", "sched_dep_hour")
BASELINE_PRIOR_WEIGHT = 20.0
CALIBRATION_BINS = 10
METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class Metrics:
    roc_auc: float
    log_loss: float
    brier: float
    calibration_error: float  # expected calibration error, 10 equal-width bins
    threshold: float
    accuracy: float
    precision: float
    recall: float
    f1: float
    confusion: dict[str, int]  # tn, fp, fn, tp


@dataclass(frozen=True)
class ChampionScore:
    version: str
    metrics: Metrics | None
    note: str = ""


@dataclass(frozen=True)
class EvaluationResult:
    model_url: str
    holdout_rows: int
    positive_rate: float
    metrics: Metrics
    baseline: Metrics
    baseline_name: str
    champion: ChampionScore | None
    plots: dict[str, str]
    report_markdown: str
    feature_importance: dict[str, float] = field(default_factory=dict)

    @property
    def auc_lift(self) -> float:
        return self.metrics.roc_auc - self.baseline.roc_auc


def best_f1_threshold(y: np.ndarray, p: np.ndarray) -> float:
    precision, recall, thresholds = skm.precision_recall_curve(y, p)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return float(thresholds[int(np.argmax(f1[:-1]))]) if len(thresholds) else 0.5


def calibration_error(y: np.ndarray, p: np.ndarray, bins: int = CALIBRATION_BINS) -> float:
    idx = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.sum() * abs(y[m].mean() - p[m].mean())
    return float(total / len(y))


def score(y: np.ndarray, p: np.ndarray, threshold: float) -> Metrics:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    pred = (p >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()
    return Metrics(
        roc_auc=float(skm.roc_auc_score(y, p)),
        log_loss=float(skm.log_loss(y, p, labels=[0, 1])),
        brier=float(skm.brier_score_loss(y, p)),
        calibration_error=calibration_error(y, p),
        threshold=float(threshold),
        accuracy=float(skm.accuracy_score(y, pred)),
        precision=float(skm.precision_score(y, pred, zero_division=0)),
        recall=float(skm.recall_score(y, pred, zero_division=0)),
        f1=float(skm.f1_score(y, pred, zero_division=0)),
        confusion={"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
    )


def baseline_table(train: Any) -> tuple[pd.DataFrame, float]:
    """Smoothed late rate per (carrier, scheduled hour) on the training slice."""
    grouped = train.groupby(list(BASELINE_KEYS), observed=True)[LABEL].agg(["sum", "count"])
    counts, overall = dask.compute(grouped, train[LABEL].mean())
    counts = counts.reset_index()
    counts["rate"] = (counts["sum"] + BASELINE_PRIOR_WEIGHT * overall) / (
        counts["count"] + BASELINE_PRIOR_WEIGHT
    )
    counts["carrier"] = counts["carrier"].astype(str)
    return counts[[*BASELINE_KEYS, "rate"]], float(overall)


def baseline_predict(table: pd.DataFrame, overall: float, frame: pd.DataFrame) -> np.ndarray:
    keys = frame[list(BASELINE_KEYS)].astype({"carrier": str}).reset_index(drop=True)
    merged = keys.merge(table, how="left", on=list(BASELINE_KEYS))
    return merged["rate"].fillna(overall).to_numpy(dtype="float64")


def predict_frame(client: Any, booster: Any, frame: Any, features: list[str]) -> Any:
    """Probabilities from a booster or a linear model (tasks/families.py) for an encoded dask frame."""
    return predict_dask(client, booster, frame[features])


def _plot_png(draw) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    try:
        draw(ax)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)


def _plots(y: np.ndarray, curves: dict[str, np.ndarray], importance: dict[str, float]) -> dict[str, bytes]:
    def roc(ax):
        for name, p in curves.items():
            fpr, tpr, _ = skm.roc_curve(y, p)
            ax.plot(fpr, tpr, label=f"{name} (AUC {skm.roc_auc_score(y, p):.3f})")
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC on the holdout")
        ax.legend(loc="lower right")

    def calibration(ax):
        edges = np.linspace(0, 1, CALIBRATION_BINS + 1)
        for name, p in curves.items():
            idx = np.minimum((p * CALIBRATION_BINS).astype(int), CALIBRATION_BINS - 1)
            xs, ys = [], []
            for b in range(CALIBRATION_BINS):
                m = idx == b
                if m.sum() >= 20:
                    xs.append(p[m].mean())
                    ys.append(y[m].mean())
            ax.plot(xs, ys, marker="o", label=name)
        ax.plot(edges, edges, ":", color="grey")
        ax.set(
            xlabel="predicted late probability",
            ylabel="observed late rate",
            title="Calibration on the holdout",
        )
        ax.legend(loc="upper left")

    def importance_plot(ax):
        top = sorted(importance.items(), key=lambda kv: kv[1])[-20:]
        ax.barh([k for k, _ in top], [v for _, v in top])
        ax.set(xlabel="total gain (share)", title="Feature importance")

    return {
        "roc": _plot_png(roc),
        "calibration": _plot_png(calibration),
        "importance": _plot_png(importance_plot),
    }


def _fmt(v: float) -> str:
    return f"{v:.4f}"


def render_leaderboard(search: dict[str, Any]) -> str:
    """The search's candidates by validation score (selection never saw the holdout)."""
    metric = search.get("metric", "auc")
    lines = [
        f"Search: {len(search.get('leaderboard', []))} candidates of budget {search.get('budget')}, "
        f"picked by validation {metric} (the holdout was not used to choose).",
        "",
        "| rank | candidate | family | valid AUC | valid log loss | rounds | seconds | hyperparameters |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, row in enumerate(search.get("leaderboard", []), start=1):
        params = ", ".join(
            f"{k}={_fmt(v) if isinstance(v, float) else v}"
            for k, v in row["hyperparameters"].items()
            if k not in {"family", "seed"}
        )
        mark = " (winner)" if row["candidate"] == search.get("winner") else ""
        lines.append(
            f"| {i} | {row['candidate']}{mark} | {row['family']} | {_fmt(row['valid_auc'])} | "
            f"{_fmt(row['valid_logloss'])} | {row['best_iteration'] + 1} | {row['seconds']:.1f} | {params} |"
        )
    return "\n".join(lines)


def render_report(
    result_metrics: Metrics,
    baseline: Metrics,
    champion: ChampionScore | None,
    holdout_rows: int,
    positive_rate: float,
    baseline_name: str,
    plots: dict[str, str],
    family: str = "gbtree",
    search: dict[str, Any] | None = None,
) -> str:
    cols = [("model (challenger)", result_metrics), (baseline_name, baseline)]
    scored = champion is not None and champion.metrics is not None
    if scored:
        cols.append((f"champion {champion.version}", champion.metrics))
    names = [
        "roc_auc",
        "log_loss",
        "brier",
        "calibration_error",
        "threshold",
        "accuracy",
        "precision",
        "recall",
        "f1",
    ]
    delta = ["challenger - champion"] if scored else []
    lines = [
        f"Model family: {family}. Holdout: {holdout_rows:,} flights, {positive_rate:.1%} arrived more than "
        "15 minutes late.",
        "",
        "| metric | " + " | ".join([*(c for c, _ in cols), *delta]) + " |",
        "|---|" + "---|" * (len(cols) + len(delta)),
    ]
    for n in names:
        cells = [_fmt(getattr(m, n)) for _, m in cols]
        if scored:  # side by side with the champion on the same holdout, and by how much it moved
            cells.append(f"{getattr(result_metrics, n) - getattr(champion.metrics, n):+.4f}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lift = result_metrics.roc_auc - baseline.roc_auc
    lines += [
        "",
        f"ROC AUC lift over the baseline: {lift:+.4f} ({'beats' if lift > 0 else 'does NOT beat'} it).",
    ]
    if champion is not None and champion.note:
        lines += ["", f"Champion: {champion.note}"]
    if search:
        lines += ["", render_leaderboard(search)]
    lines += ["", "Plots: " + ", ".join(f"[{k}]({v})" for k, v in plots.items())]
    return "\n".join(lines)


def evaluate(
    store: Store,
    cleaned: CleanResult,
    trained: TrainResult,
    client: Any,
    split: SplitParams = SplitParams(),
    champion_url: str | None = None,
    champion_version: str | None = None,
) -> EvaluationResult:
    features = trained.features
    cols = [*features, LABEL]
    # Raw (unencoded) slices, each model encodes them with the categories it was trained with.
    raw_holdout = load_split(store, cleaned.silver.url, split, "holdout", cols, encode=False).persist()
    raw_valid = load_split(store, cleaned.silver.url, split, "valid", cols, encode=False).persist()
    holdout, valid = categorize(raw_holdout, trained.categories), categorize(raw_valid, trained.categories)
    train_frame = load_split(store, cleaned.silver.url, split, "train", [*BASELINE_KEYS, LABEL])
    booster = load_booster(store, trained.model_url)
    booster.set_param({"device": "cpu"} if trained.device == "cpu" else {"device": trained.device})

    p_hold, p_valid, y_hold, y_valid, keys_hold, keys_valid = dask.compute(
        predict_frame(client, booster, holdout, features),
        predict_frame(client, booster, valid, features),
        holdout[LABEL],
        valid[LABEL],
        holdout[list(BASELINE_KEYS)],
        valid[list(BASELINE_KEYS)],
    )
    if len(y_hold) == 0:
        raise ValueError(f"{cleaned.silver.url}: the holdout slice of the time split {split} is empty")
    y_hold, y_valid = np.asarray(y_hold, dtype=int), np.asarray(y_valid, dtype=int)
    p_hold, p_valid = np.asarray(p_hold, dtype=float), np.asarray(p_valid, dtype=float)
    model_metrics = score(y_hold, p_hold, best_f1_threshold(y_valid, p_valid))

    table, overall = baseline_table(train_frame)
    b_hold, b_valid = (
        baseline_predict(table, overall, keys_hold),
        baseline_predict(table, overall, keys_valid),
    )
    baseline_metrics = score(y_hold, b_hold, best_f1_threshold(y_valid, b_valid))
    baseline_name = "baseline (late rate by carrier x hour)"

    curves = {"model": p_hold, "baseline": b_hold}
    champion = None
    if champion_url is not None and champion_version is not None and champion_version != trained.version:
        champion = _score_champion(
            store, client, champion_url, champion_version, raw_holdout, raw_valid, y_hold, y_valid, curves
        )

    shares = importance(booster)
    plot_urls = {}
    for name, png in _plots(y_hold, curves, shares).items():
        url = posixpath.join(trained.model_url, f"{name}.png")
        write_bytes_atomic(store, url, png)
        plot_urls[name] = url
    report = render_report(
        model_metrics,
        baseline_metrics,
        champion,
        len(y_hold),
        float(y_hold.mean()),
        baseline_name,
        plot_urls,
        trained.family,
        trained.search,
    )
    result = EvaluationResult(
        model_url=trained.model_url,
        holdout_rows=int(len(y_hold)),
        positive_rate=float(y_hold.mean()),
        metrics=model_metrics,
        baseline=baseline_metrics,
        baseline_name=baseline_name,
        champion=champion,
        plots=plot_urls,
        report_markdown=report,
        feature_importance=shares,
    )
    write_bytes_atomic(store, posixpath.join(trained.model_url, "report.md"), report.encode())
    write_json_atomic(store, posixpath.join(trained.model_url, METRICS_FILE), asdict(result))
    return result


def _score_champion(
    store: Store,
    client: Any,
    url: str,
    version: str,
    holdout: Any,
    valid: Any,
    y_hold: np.ndarray,
    y_valid: np.ndarray,
    curves: dict[str, np.ndarray],
) -> ChampionScore:
    from conveyor.tasks.train import train_info

    try:
        info = train_info(store, url)
        booster = load_booster(store, url)
    except Exception as exc:
        return ChampionScore(
            version, None, f"could not load champion {version} ({type(exc).__name__}: {exc})"
        )
    missing = [f for f in info.features if f not in holdout.columns]
    if missing:
        return ChampionScore(version, None, f"champion {version} needs features this data lacks: {missing}")
    hold = categorize(holdout[info.features], info.categories)
    val = categorize(valid[info.features], info.categories)
    p_hold, p_valid = dask.compute(
        predict_frame(client, booster, hold, info.features),
        predict_frame(client, booster, val, info.features),
    )
    p_hold, p_valid = np.asarray(p_hold, dtype=float), np.asarray(p_valid, dtype=float)
    curves[f"champion {version}"] = p_hold
    return ChampionScore(
        version,
        score(y_hold, p_hold, best_f1_threshold(y_valid, p_valid)),
        f"scored on the same holdout ({len(y_hold):,} rows)",
    )
