"""Evaluate: the trained model, a naive baseline and the current champion on one holdout, per task.

What is scored comes from the model's training record and the silver manifest
(label, task, classes, baseline keys, gate metric), never from a pipeline's
constants. Per task:

* ``binary``: ROC AUC, log loss, Brier, calibration, and the confusion at a
  threshold chosen on the validation slice (max F1), never on the holdout.
  Baseline: the positive rate per baseline-key group on the training slice,
  shrunk towards the overall rate where a group is thin.
* ``multiclass``: accuracy, macro-F1, log loss, the confusion matrix and
  per-class precision/recall/F1. Baseline: the class prior per group (or
  overall), shrunk the same way.
* ``regression``: RMSE, MAE, R². Baseline: the training mean per group (or
  overall), shrunk the same way.

The holdout and validation slices are read in one pass, partition by partition
on the workers (:func:`score_slice`): each partition is reduced to its label and
the predictions of the model, the baseline and the champion, so no process holds
the raw slices; only those few columns come back to compute the metrics.

The report (markdown) carries its plots inline as PNG data URIs, so the Prefect
UI shows them; the PNG files are written beside the model too.
"""

from __future__ import annotations

import base64
import io
import posixpath
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import dask
import numpy as np
import pandas as pd

from conveyor.store.storage import Store, write_bytes_atomic, write_json_atomic
from conveyor.tasks.train import (
    SplitParams,
    Target,
    TrainResult,
    encode,
    importance,
    load_booster,
    load_split,
    silver_schema,
)

if TYPE_CHECKING:
    from conveyor.tasks.clean import CleanResult

BASELINE_PRIOR_WEIGHT = 20.0
CALIBRATION_BINS = 10
METRICS_FILE = "metrics.json"
PLOT_DPI = 80
RESIDUAL_POINTS = 4_000  # points drawn in the residual plot (a seeded sample of the holdout)

# The direction of every metric a gate, a guard or a monitor may name: the one definition.
HIGHER_IS_BETTER = frozenset({"roc_auc", "accuracy", "precision", "recall", "f1", "macro_f1", "r2"})
LOWER_IS_BETTER = frozenset({"log_loss", "brier", "calibration_error", "rmse", "mae"})


def higher_is_better(metric: str) -> bool:
    if metric in HIGHER_IS_BETTER:
        return True
    if metric in LOWER_IS_BETTER:
        return False
    raise ValueError(f"metric {metric!r} is not one of {sorted(HIGHER_IS_BETTER | LOWER_IS_BETTER)}")


def improvement(metric: str, value: float, reference: float) -> float:
    """How much better ``value`` is than ``reference`` (negative: worse), whatever the metric's direction."""
    return value - reference if higher_is_better(metric) else reference - value


@dataclass(frozen=True)
class Metrics:
    """Binary classification on the holdout."""

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
class MulticlassMetrics:
    """Multiclass classification on the holdout (predicted class: the most probable one)."""

    accuracy: float
    macro_f1: float
    log_loss: float
    confusion: list[list[int]]  # [actual][predicted], classes in code order
    per_class: dict[str, dict[str, float]]  # class -> precision, recall, f1, support


@dataclass(frozen=True)
class RegressionMetrics:
    rmse: float
    mae: float
    r2: float


AnyMetrics = Metrics | MulticlassMetrics | RegressionMetrics
HEADLINE = {"binary": ("roc_auc", "log_loss", "f1"), "multiclass": ("macro_f1", "accuracy", "log_loss")}
HEADLINE["regression"] = ("rmse", "mae", "r2")
METRIC_NAMES = {
    "binary": (
        "roc_auc",
        "log_loss",
        "brier",
        "calibration_error",
        "threshold",
        "accuracy",
        "precision",
        "recall",
        "f1",
    ),
    "multiclass": ("accuracy", "macro_f1", "log_loss"),
    "regression": ("rmse", "mae", "r2"),
}


def metric_names(task: str) -> tuple[str, ...]:
    """The scalar metrics of a task (what a gate or a guard may name; ``threshold`` is not a score)."""
    return tuple(n for n in METRIC_NAMES[task] if n != "threshold")


@dataclass(frozen=True)
class ChampionScore:
    version: str
    metrics: AnyMetrics | None
    note: str = ""


@dataclass(frozen=True)
class EvaluationResult:
    model_url: str
    holdout_rows: int
    positive_rate: float  # binary: share of positives in the holdout; NaN for the other tasks
    metrics: AnyMetrics
    baseline: AnyMetrics
    baseline_name: str
    champion: ChampionScore | None
    plots: dict[str, str]  # name -> URL of the PNG file (the report carries them inline too)
    report_markdown: str
    feature_importance: dict[str, float] = field(default_factory=dict)
    task: str = "binary"
    gate_metric: str = "roc_auc"
    label: str = ""
    classes: list[str] = field(default_factory=list)
    label_summary: dict[str, float] = field(default_factory=dict)  # class shares, or mean/std of the label
    reused: bool = False  # read from the committed evaluation record, not recomputed

    @property
    def auc_lift(self) -> float:
        return self.metrics.roc_auc - self.baseline.roc_auc

    @property
    def lift(self) -> float:
        """How much the model beats the baseline on the gate metric (positive: better)."""
        m = self.gate_metric
        return improvement(m, getattr(self.metrics, m), getattr(self.baseline, m))

    def headline(self) -> str:
        """One line for logs and summaries: the gate metric, model vs baseline."""
        m = self.gate_metric
        return (
            f"holdout {m} {getattr(self.metrics, m):.4f} vs baseline {getattr(self.baseline, m):.4f} "
            f"({'better' if higher_is_better(m) else 'lower is better'}; lift {self.lift:+.4f})"
        )


# --- scores -------------------------------------------------------------------------------


def best_f1_threshold(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn import metrics as skm

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
    from sklearn import metrics as skm

    p = np.clip(p, 1e-7, 1 - 1e-7)
    y = np.asarray(y)
    pred = p >= threshold
    positive = y == 1
    # The label metrics from the confusion counts, as scikit-learn defines them (zero_division=0):
    # one pass instead of four validated calls (tests/tasks/test_train_evaluate_deploy.py compares them).
    tp = int(np.count_nonzero(pred & positive))
    fp = int(np.count_nonzero(pred & ~positive))
    fn = int(np.count_nonzero(~pred & positive))
    tn = len(y) - tp - fp - fn
    return Metrics(
        roc_auc=float(skm.roc_auc_score(y, p)),
        log_loss=float(skm.log_loss(y, p, labels=[0, 1])),
        brier=float(np.mean((p - y) ** 2)),
        calibration_error=calibration_error(y, p),
        threshold=float(threshold),
        accuracy=(tp + tn) / len(y),
        precision=tp / (tp + fp) if tp + fp else 0.0,
        recall=tp / (tp + fn) if tp + fn else 0.0,
        f1=2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
        confusion={"tn": tn, "fp": fp, "fn": fn, "tp": tp},
    )


def score_multiclass(y: np.ndarray, p: np.ndarray, classes: list[str]) -> MulticlassMetrics:
    """``y``: class codes; ``p``: one probability column per class, in code order."""
    from sklearn import metrics as skm

    labels = list(range(len(classes)))
    p = np.clip(p, 1e-7, 1.0)
    p = p / p.sum(axis=1, keepdims=True)
    pred = p.argmax(axis=1)
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y, pred, labels=labels, zero_division=0
    )
    return MulticlassMetrics(
        accuracy=float(skm.accuracy_score(y, pred)),
        macro_f1=float(skm.f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        log_loss=float(skm.log_loss(y, p, labels=labels)),
        confusion=skm.confusion_matrix(y, pred, labels=labels).astype(int).tolist(),
        per_class={
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
    )


def score_regression(y: np.ndarray, p: np.ndarray) -> RegressionMetrics:
    from sklearn import metrics as skm

    return RegressionMetrics(
        rmse=float(np.sqrt(skm.mean_squared_error(y, p))),
        mae=float(skm.mean_absolute_error(y, p)),
        r2=float(skm.r2_score(y, p)) if len(y) > 1 and np.ptp(y) > 0 else 0.0,
    )


def score_target(
    target: Target,
    y: np.ndarray,
    p: np.ndarray,
    y_valid: np.ndarray | None = None,
    p_valid: np.ndarray | None = None,
    threshold: float | None = None,
) -> AnyMetrics:
    """The task's metrics; binary picks its threshold on the validation slice unless one is given."""
    if target.task == "binary":
        if threshold is None:
            threshold = best_f1_threshold(y_valid, p_valid) if y_valid is not None else 0.5
        return score(y.astype(int), p, threshold)
    if target.task == "multiclass":
        return score_multiclass(y.astype(int), p, list(target.classes))
    return score_regression(y, p)


def as_array(values: Any, target: Target) -> np.ndarray:
    """Computed predictions as an array: (n,) for binary and regression, (n, classes) for multiclass."""
    out = np.asarray(values, dtype="float64")
    if target.task == "multiclass":
        return out.reshape(len(out), target.num_class) if out.size else out.reshape(0, target.num_class)
    return out.reshape(-1)


# --- the naive baseline -------------------------------------------------------------------


@dataclass(frozen=True)
class Baseline:
    """A smoothed mean of the label (binary, regression) or of each class (multiclass) per group of keys."""

    keys: list[str]
    as_text: list[str]  # keys compared as strings (categorical codes and text)
    table: pd.DataFrame  # keys + value columns
    columns: list[str]  # value columns: ["rate"] or one per class
    overall: np.ndarray  # the training slice's value(s), for unseen or missing groups


def _text_keys(frame: Any, keys: list[str], categorical: Any) -> list[str]:
    return [k for k in keys if k in categorical or not pd.api.types.is_numeric_dtype(frame[k].dtype)]


def fit_baseline(train: Any, target: Target, keys: list[str], categorical: Any) -> Baseline:
    """The baseline from the training slice (a dask frame of the keys and the label), in one pass."""
    label = target.label
    as_text = _text_keys(train, keys, categorical)
    w = BASELINE_PRIOR_WEIGHT
    if target.task == "multiclass":
        k = target.num_class
        by_class = train[label].value_counts()
        sizes = train.groupby([*keys, label], observed=True).size() if keys else None
        class_counts, sizes = dask.compute(by_class, sizes)
        counts = class_counts.reindex(range(k), fill_value=0).to_numpy(dtype="float64")
        overall = counts / max(counts.sum(), 1.0)
        columns = [f"p{j}" for j in range(k)]
        if not keys:
            return Baseline([], [], pd.DataFrame(columns=columns), columns, overall)
        wide = sizes.unstack(label, fill_value=0).reindex(columns=range(k), fill_value=0)
        n = wide.sum(axis=1).to_numpy(dtype="float64")[:, None]
        probs = (wide.to_numpy(dtype="float64") + w * overall) / (n + w)
        table = wide.index.to_frame(index=False)
        table[columns] = probs
    else:
        if not keys:
            overall = float(dask.compute(train[label].mean())[0])
            return Baseline([], [], pd.DataFrame(columns=["rate"]), ["rate"], np.array([overall]))
        grouped = train.groupby(keys, observed=True)[label].agg(["sum", "count"])
        counts, mean = dask.compute(grouped, train[label].mean())
        counts = counts.reset_index()
        counts["rate"] = (counts["sum"] + w * mean) / (counts["count"] + w)
        table, columns, overall = counts, ["rate"], np.array([float(mean)])
    for key in as_text:
        table[key] = table[key].astype(str)
    return Baseline(keys, as_text, table[[*keys, *columns]], columns, overall)


def baseline_predict(baseline: Baseline, frame: pd.DataFrame) -> np.ndarray:
    """The baseline's prediction per row of ``frame`` (the keys): the group's value, else the overall one."""
    if not baseline.keys:
        out = np.tile(baseline.overall, (len(frame), 1))
        return out if len(baseline.columns) > 1 else out[:, 0]
    keys = frame[baseline.keys].astype(dict.fromkeys(baseline.as_text, str)).reset_index(drop=True)
    merged = keys.merge(baseline.table, how="left", on=baseline.keys)
    if len(baseline.columns) == 1:
        return merged["rate"].fillna(baseline.overall[0]).to_numpy(dtype="float64")
    values = merged[baseline.columns].to_numpy(dtype="float64")
    missing = np.isnan(values).any(axis=1)
    values[missing] = baseline.overall
    return values


def baseline_name(target: Target, keys: list[str]) -> str:
    what = {
        "binary": f"{target.label} rate",
        "multiclass": "class prior",
        "regression": f"mean {target.label}",
    }[target.task]
    return f"baseline ({what} by {' x '.join(keys)})" if keys else f"baseline (overall {what})"


# --- one pass over a slice ----------------------------------------------------------------


@dataclass(frozen=True)
class Scorer:
    """A model scored in the holdout pass: an ``xgboost.Booster`` or a linear model, and what it reads."""

    name: str  # prefix of its prediction columns
    model: Any
    features: list[str]
    categories: dict[str, list[str]]


def score_columns(name: str, width: int) -> list[str]:
    return [f"{name}{j}" for j in range(width)]


def score_partition(
    part: pd.DataFrame, scorers: list[Scorer], label: str, baseline: Baseline, width: int
) -> pd.DataFrame:
    """One partition of a raw slice reduced to the label and every model's and the baseline's predictions.

    ``width`` is the number of prediction columns per model (the class count
    for multiclass, else 1). Model predictions stay float32 (what XGBoost
    computes), the label and the baseline float64. The baseline's keys are
    encoded as the first scorer (the model) encodes them, as they were when
    the baseline was fitted on the encoded training slice.
    """
    n = len(part)
    out: dict[str, np.ndarray] = {"y": part[label].to_numpy(dtype="float64")}
    for s in scorers:
        if n:
            encoded = encode(part[s.features], s.categories, s.features)
            p = np.asarray(s.model.inplace_predict(encoded), dtype="float32").reshape(n, width)
        else:
            p = np.empty((0, width), dtype="float32")
        out.update(zip(score_columns(s.name, width), p.T, strict=True))
    if baseline.keys:
        model = scorers[0]
        numeric = [k for k in baseline.keys if k in model.features]
        keys = encode(part[baseline.keys], model.categories, numeric)
    else:
        keys = pd.DataFrame(index=range(n))
    b = np.asarray(baseline_predict(baseline, keys), dtype="float64").reshape(n, width)
    out.update(zip(score_columns("baseline", width), b.T, strict=True))
    return pd.DataFrame(out)


def score_slice(raw: Any, scorers: list[Scorer], label: str, baseline: Baseline, target: Target) -> Any:
    """A lazy frame of :func:`score_partition` over every partition of ``raw`` (a raw, unencoded slice)."""
    width = target.num_class or 1
    meta = {"y": "float64"}
    for s in scorers:
        meta |= dict.fromkeys(score_columns(s.name, width), "float32")
    meta |= dict.fromkeys(score_columns("baseline", width), "float64")
    empty = pd.DataFrame({c: pd.Series(dtype=t) for c, t in meta.items()})
    return raw.map_partitions(score_partition, scorers, label, baseline, width, meta=empty)


def predictions(scored: pd.DataFrame, name: str, target: Target) -> np.ndarray:
    """One model's predictions from a computed :func:`score_slice`, shaped as :func:`as_array` does."""
    return as_array(scored[score_columns(name, target.num_class or 1)].to_numpy(), target)


# --- plots --------------------------------------------------------------------------------


def _plot_png(draw, size: tuple[float, float] = (5.6, 4.2)) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size, dpi=PLOT_DPI)
    try:
        draw(ax)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)


def _importance_plot(shares: dict[str, float]):
    def draw(ax):
        top = sorted(shares.items(), key=lambda kv: kv[1])[-20:]
        ax.barh([k for k, _ in top], [v for _, v in top])
        ax.set(xlabel="total gain (share)", title="Feature importance")

    return draw


def _binary_plots(y: np.ndarray, curves: dict[str, np.ndarray]) -> dict[str, Any]:
    from sklearn import metrics as skm

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
        ax.set(xlabel="predicted probability", ylabel="observed rate", title="Calibration on the holdout")
        ax.legend(loc="upper left")

    return {"roc": roc, "calibration": calibration}


def _confusion_plot(confusion: list[list[int]], classes: list[str]):
    def draw(ax):
        counts = np.asarray(confusion, dtype="float64")
        shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
        ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
        ticks = range(len(classes))
        ax.set_xticks(ticks, classes, rotation=30, ha="right")
        ax.set_yticks(ticks, classes)
        for i in ticks:
            for j in ticks:
                colour = "white" if shares[i, j] > 0.6 else "black"
                text = f"{int(counts[i, j]):,}\n{shares[i, j]:.0%}"
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color=colour)
        ax.set(xlabel="predicted", ylabel="actual", title="Confusion on the holdout (row shares)")

    return draw


def _residual_plot(y: np.ndarray, curves: dict[str, np.ndarray], label: str):
    def draw(ax):
        rng = np.random.default_rng(0)
        idx = rng.choice(len(y), size=min(len(y), RESIDUAL_POINTS), replace=False)
        for name, p in curves.items():
            ax.scatter(y[idx], p[idx], s=4, alpha=0.35, label=name)
        lo, hi = float(np.min(y)), float(np.max(y))
        ax.plot([lo, hi], [lo, hi], ":", color="grey")
        ax.set(xlabel=f"actual {label}", ylabel="predicted", title="Predicted vs actual on the holdout")
        ax.legend(loc="upper left", markerscale=3)

    return draw


def _plots(
    target: Target,
    y: np.ndarray,
    curves: dict[str, np.ndarray],
    metrics: AnyMetrics,
    shares: dict[str, float],
) -> dict[str, bytes]:
    if target.task == "binary":
        draws = _binary_plots(y, curves)
    elif target.task == "multiclass":
        draws = {"confusion": _confusion_plot(metrics.confusion, list(target.classes))}
    else:
        draws = {"residuals": _residual_plot(y, curves, target.label)}
    draws["importance"] = _importance_plot(shares)
    return {name: _plot_png(draw) for name, draw in draws.items()}


def inline_image(name: str, png: bytes) -> str:
    """Markdown for a PNG embedded as a data URI (renders in the Prefect UI, unlike a file:// link)."""
    return f"![{name}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"


# --- the report ---------------------------------------------------------------------------


def _fmt(v: float) -> str:
    return f"{v:.4f}"


def render_leaderboard(search: dict[str, Any]) -> str:
    """The search's candidates by validation score (selection never saw the holdout)."""
    metric = search.get("metric", "auc")
    board = search.get("leaderboard", [])
    shown = list(board[0].get("valid_metrics") or {}) if board else []
    shown = shown or ["auc", "logloss"]
    lines = [
        f"Search: {len(board)} candidates of budget {search.get('budget')}, "
        f"picked by validation {metric} (the holdout was not used to choose).",
        "",
        "| rank | candidate | family | "
        + " | ".join(f"valid {m}" for m in shown)
        + " | rounds | seconds | hyperparameters |",
        "|---|---|---|" + "---|" * len(shown) + "---|---|---|",
    ]
    for i, row in enumerate(board, start=1):
        params = ", ".join(
            f"{k}={_fmt(v) if isinstance(v, float) else v}"
            for k, v in row["hyperparameters"].items()
            if k not in {"family", "seed"}
        )
        valid = row.get("valid_metrics") or {"auc": row.get("valid_auc"), "logloss": row.get("valid_logloss")}
        cells = " | ".join(_fmt(valid[m]) if valid.get(m) is not None else "" for m in shown)
        mark = " (winner)" if row["candidate"] == search.get("winner") else ""
        lines.append(
            f"| {i} | {row['candidate']}{mark} | {row['family']} | {cells} | "
            f"{row['best_iteration'] + 1} | {row['seconds']:.1f} | {params} |"
        )
    return "\n".join(lines)


def _describe_holdout(target: Target, rows: int, summary: dict[str, float]) -> str:
    if target.task == "binary":
        named = f" ({target.classes[-1]})" if target.classes and target.classes[-1] != "1" else ""
        return f"Holdout: {rows:,} rows, {summary['positive_rate']:.1%} with {target.label} = 1{named}."
    if target.task == "multiclass":
        shares = ", ".join(f"{c} {summary[c]:.1%}" for c in target.classes)
        return f"Holdout: {rows:,} rows of {len(target.classes)} classes of {target.label}: {shares}."
    return f"Holdout: {rows:,} rows, {target.label} mean {summary['mean']:.4g}, std {summary['std']:.4g}."


def _metrics_table(names: tuple[str, ...], cols: list[tuple[str, AnyMetrics]], champion: AnyMetrics | None):
    delta = ["challenger - champion"] if champion is not None else []
    lines = [
        "| metric | " + " | ".join([*(c for c, _ in cols), *delta]) + " |",
        "|---|" + "---|" * (len(cols) + len(delta)),
    ]
    model = cols[0][1]
    for n in names:
        cells = [_fmt(getattr(m, n)) for _, m in cols]
        if (
            champion is not None
        ):  # side by side with the champion on the same holdout, and by how much it moved
            cells.append(f"{getattr(model, n) - getattr(champion, n):+.4f}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def _multiclass_tables(metrics: MulticlassMetrics, classes: list[str]) -> list[str]:
    lines = [
        "",
        "Per class (model):",
        "",
        "| class | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
    ]
    for name in classes:
        c = metrics.per_class[name]
        scores = " | ".join(_fmt(c[k]) for k in ("precision", "recall", "f1"))
        lines.append(f"| {name} | {scores} | {int(c['support']):,} |")
    lines += [
        "",
        "Confusion matrix (rows: actual, columns: predicted):",
        "",
        "| actual \\ predicted | " + " | ".join(classes) + " |",
        "|---|" + "---|" * len(classes),
    ]
    for name, row in zip(classes, metrics.confusion, strict=True):
        lines.append(f"| {name} | " + " | ".join(f"{v:,}" for v in row) + " |")
    return lines


def render_report(
    target: Target,
    gate_metric: str,
    result_metrics: AnyMetrics,
    baseline: AnyMetrics,
    champion: ChampionScore | None,
    holdout_rows: int,
    label_summary: dict[str, float],
    baseline_label: str,
    images: dict[str, str],
    files: dict[str, str],
    family: str = "gbtree",
    search: dict[str, Any] | None = None,
) -> str:
    """report.md: the metrics side by side, how much the model beats the baseline, the plots inline."""
    cols: list[tuple[str, AnyMetrics]] = [("model (challenger)", result_metrics), (baseline_label, baseline)]
    champ = champion.metrics if champion is not None and champion.metrics is not None else None
    if champ is not None:
        cols.append((f"champion {champion.version}", champ))
    lines = [
        f"Model family: {family}. Task: {target.task} on `{target.label}`. "
        + _describe_holdout(target, holdout_rows, label_summary),
        "",
        *_metrics_table(METRIC_NAMES[target.task], cols, champ),
    ]
    if isinstance(result_metrics, MulticlassMetrics):
        lines += _multiclass_tables(result_metrics, list(target.classes))
    lines.append("")
    if target.task == "binary":
        lift = result_metrics.roc_auc - baseline.roc_auc
        lines.append(
            f"ROC AUC lift over the baseline: {lift:+.4f} ({'beats' if lift > 0 else 'does NOT beat'} it)."
        )
    ours, theirs = getattr(result_metrics, gate_metric), getattr(baseline, gate_metric)
    gain = improvement(gate_metric, ours, theirs)
    relative = f", {gain / abs(theirs):+.1%} of the baseline's" if theirs else ""
    direction = "higher" if higher_is_better(gate_metric) else "lower"
    lines.append(
        f"Gate metric {gate_metric} ({direction} is better): model {ours:.4f} vs baseline {theirs:.4f}, "
        f"better by {gain:+.4f}{relative} ({'beats' if gain > 0 else 'does NOT beat'} the baseline)."
    )
    if champion is not None and champion.note:
        lines += ["", f"Champion: {champion.note}"]
    if search:
        lines += ["", render_leaderboard(search)]
    lines += ["", "## Plots", ""]
    for image in images.values():
        lines += [image, ""]
    lines.append("PNG files: " + ", ".join(f"`{url}`" for url in files.values()))
    return "\n".join(lines)


# --- the stage ----------------------------------------------------------------------------


def _label_summary(target: Target, y: np.ndarray) -> dict[str, float]:
    if target.task == "binary":
        return {"positive_rate": float(y.mean()) if len(y) else 0.0}
    if target.task == "multiclass":
        counts = np.bincount(y.astype(int), minlength=target.num_class)[: target.num_class]
        return {c: float(n / max(len(y), 1)) for c, n in zip(target.classes, counts, strict=True)}
    return {"mean": float(np.mean(y)), "std": float(np.std(y))}


def evaluate(
    store: Store,
    cleaned: CleanResult,
    trained: TrainResult,
    client: Any,
    split: SplitParams | None = None,
    champion_url: str | None = None,
    champion_version: str | None = None,
) -> EvaluationResult:
    """Score the model, the naive baseline and the champion on the holdout of the split it was trained on."""
    schema = silver_schema(store, cleaned.silver.url)
    split = split or (SplitParams(**trained.split) if trained.split else schema.split_params())
    target = trained.target
    label, features, keys = target.label, trained.features, list(schema.baseline_keys)
    binary = target.task == "binary"
    cols = list(dict.fromkeys([*features, *keys, label]))
    url = cleaned.silver.url
    booster = load_booster(store, trained.model_url)
    booster.set_param({"device": "cpu"} if trained.device == "cpu" else {"device": trained.device})
    scorers = [Scorer("model", booster, features, trained.categories)]
    champion = None
    if champion_url is not None and champion_version is not None and champion_version != trained.version:
        champion, champion_scorer = _load_champion(store, champion_url, champion_version, target, cols)
        if champion_scorer is not None:
            scorers.append(champion_scorer)

    train_frame = load_split(store, url, split, "train", [*keys, label], schema=schema)
    base = fit_baseline(train_frame, target, keys, trained.categories)
    # Raw (unencoded) slices, each model encodes them with the categories it was trained with.
    lazy = []
    for part in ("holdout", "valid") if binary else ("holdout",):
        raw = load_split(store, url, split, part, cols, encode=False, schema=schema)
        lazy.append(score_slice(raw, scorers, label, base, target))
    computed = dask.compute(*lazy)
    hold_scored, valid_scored = computed[0], computed[1] if binary else None
    if len(hold_scored) == 0:
        raise ValueError(f"{url}: the holdout slice of the {split.kind} split {split} is empty")
    y_hold = hold_scored["y"].to_numpy(dtype=int if target.task != "regression" else "float64")
    y_valid = valid_scored["y"].to_numpy(dtype=int) if binary else None

    def scored(name: str) -> tuple[np.ndarray, np.ndarray | None]:
        p_valid = predictions(valid_scored, name, target) if binary else None
        return predictions(hold_scored, name, target), p_valid

    p_hold, p_valid = scored("model")
    model_metrics = score_target(target, y_hold, p_hold, y_valid, p_valid)
    b_hold, b_valid = scored("baseline")
    baseline_metrics = score_target(target, y_hold, b_hold, y_valid, b_valid)
    base_name = baseline_name(target, keys)
    curves = {"model": p_hold, "baseline": b_hold}
    if champion is not None and len(scorers) > 1:
        c_hold, c_valid = scored("champion")
        curves[f"champion {champion.version}"] = c_hold
        champion = ChampionScore(
            champion.version,
            score_target(target, y_hold, c_hold, y_valid, c_valid),
            f"scored on the same holdout ({len(y_hold):,} rows)",
        )

    shares = importance(booster)
    pngs = _plots(target, y_hold, curves, model_metrics, shares)
    plot_urls = {}
    for name, png in pngs.items():
        plot_url = posixpath.join(trained.model_url, f"{name}.png")
        write_bytes_atomic(store, plot_url, png)
        plot_urls[name] = plot_url
    summary = _label_summary(target, y_hold)
    report = render_report(
        target,
        schema.gate_metric,
        model_metrics,
        baseline_metrics,
        champion,
        len(y_hold),
        summary,
        base_name,
        {name: inline_image(name, png) for name, png in pngs.items()},
        plot_urls,
        trained.family,
        trained.search,
    )
    result = EvaluationResult(
        model_url=trained.model_url,
        holdout_rows=int(len(y_hold)),
        positive_rate=summary.get("positive_rate", float("nan")),
        metrics=model_metrics,
        baseline=baseline_metrics,
        baseline_name=base_name,
        champion=champion,
        plots=plot_urls,
        report_markdown=report,
        feature_importance=shares,
        task=target.task,
        gate_metric=schema.gate_metric,
        label=label,
        classes=list(target.classes),
        label_summary=summary,
    )
    write_bytes_atomic(store, posixpath.join(trained.model_url, "report.md"), report.encode())
    write_json_atomic(store, posixpath.join(trained.model_url, METRICS_FILE), asdict(result))
    return result


def _load_champion(
    store: Store, url: str, version: str, target: Target, columns: list[str]
) -> tuple[ChampionScore, Scorer | None]:
    """The champion to score beside the model, or a score with only a note saying why it cannot be."""
    from conveyor.tasks.train import train_info

    try:
        info = train_info(store, url)
        booster = load_booster(store, url)
    except Exception as exc:
        return ChampionScore(
            version, None, f"could not load champion {version} ({type(exc).__name__}: {exc})"
        ), None
    if (info.task, info.label) != (target.task, target.label) or (
        target.task == "multiclass" and list(info.classes) != list(target.classes)
    ):
        return ChampionScore(
            version,
            None,
            f"champion {version} predicts {info.task} {info.label} {info.classes}, "
            f"not {target.task} {target.label} {list(target.classes)}",
        ), None
    missing = [f for f in info.features if f not in columns]
    if missing:
        return ChampionScore(
            version, None, f"champion {version} needs features this data lacks: {missing}"
        ), None
    return ChampionScore(version, None), Scorer("champion", booster, list(info.features), info.categories)
