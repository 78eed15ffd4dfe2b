"""Model families beyond boosted trees: a random forest and a linear model, both trained on the Dask cluster.

* ``gbtree`` and ``random_forest`` are XGBoost boosters trained with
  ``xgboost.dask`` (a forest is one round of ``num_parallel_tree`` trees with
  row and column sampling, learning rate 1), so they predict through the same
  ``Booster.inplace_predict`` as before; both serve every task (binary,
  multiclass through ``multi:softprob``, regression).
* ``linear`` is an L2-regularised logistic regression, so **binary only**
  (``conveyor.tasks.train.check_family`` refuses it for another task; a
  search skips it). XGBoost's ``gblinear``
  refuses distributed training (``xgboost.dask``: "booster `gblinear` is not
  supported for distributed training", and it has no ``inplace_predict``), so
  it is fitted here by L-BFGS whose loss and gradient are one map-reduce over
  the data partitions on the Dask workers per step. Its preprocessing (one-hot
  of the categorical codes, standardisation of numeric features with missing
  values at the training mean) is part of the model artifact, so every caller
  hands it the same encoded frame as a booster and gets probabilities back.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

Family = Literal["gbtree", "random_forest", "linear"]
FAMILIES: tuple[str, ...] = ("gbtree", "random_forest", "linear")
LINEAR_FILE = "model.json"
LINEAR_FORMAT = "conveyor-logistic-regression/1"


@dataclass(frozen=True)
class ForestParams:
    """A random forest: ``n_trees`` trees grown in one XGBoost round, each on a row and column sample."""

    n_trees: int = 100
    max_depth: int = 10
    min_child_weight: float = 5.0
    subsample: float = 0.632
    colsample_bynode: float = 0.6
    max_cat_to_onehot: int = 4


@dataclass(frozen=True)
class LinearParams:
    """Logistic regression on one-hot categoricals and standardised numeric features."""

    l2: float = 1e-4  # penalty l2/2 * |w|^2 added to the mean log loss (the intercept is not penalised)
    max_iter: int = 200  # L-BFGS iterations
    tol: float = 1e-7  # stop when the projected gradient is this small
    early_stopping_rounds: int = (
        10  # stop when the validation log loss has not improved for this many iterations
    )


# --- the linear model ---------------------------------------------------------------------


@dataclass
class LinearModel:
    """Weights over a fixed design: standardised numeric columns, then one-hot blocks of categorical codes.

    Mirrors the small part of ``xgboost.Booster`` the rest of the code uses
    (``inplace_predict``, ``num_features``, ``feature_names``, ``set_param``).
    """

    features: list[str]
    numeric: dict[str, list[float]]  # feature -> [mean, std] on the training slice
    onehot: dict[str, int]  # categorical feature -> number of categories (codes 0..n-1; missing -> all zero)
    weights: list[float]  # one per design column (numeric first, in ``features`` order, then one-hot blocks)
    bias: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def feature_names(self) -> list[str]:
        return list(self.features)

    def num_features(self) -> int:
        return len(self.features)

    def set_param(self, *_: Any, **__: Any) -> None:  # a booster's device/nthread settings mean nothing here
        return None

    def design_columns(self) -> list[str]:
        cols = [f for f in self.features if f in self.numeric]
        for f in self.features:
            cols += [f"{f}={i}" for i in range(self.onehot.get(f, 0))]
        return cols

    def design(self, frame: pd.DataFrame) -> np.ndarray:
        return design_matrix(frame, self.features, self.numeric, self.onehot)

    def margin(self, frame: pd.DataFrame) -> np.ndarray:
        return self.design(frame) @ np.asarray(self.weights, dtype="float64") + self.bias

    def inplace_predict(self, frame: pd.DataFrame) -> np.ndarray:
        """Late probabilities for an encoded feature frame (as produced by
        ``conveyor.tasks.train.encode``)."""
        return _sigmoid(self.margin(frame))

    def importance(self) -> dict[str, float]:
        """|standardised weight| summed per input feature (one-hot blocks summed)."""
        out: dict[str, float] = {}
        for col, w in zip(self.design_columns(), self.weights, strict=False):
            name = col.split("=", 1)[0]
            out[name] = out.get(name, 0.0) + abs(float(w))
        return out

    def to_bytes(self) -> bytes:
        body = {"format": LINEAR_FORMAT, **asdict(self)}
        return json.dumps(body, sort_keys=True, allow_nan=False).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> LinearModel:
        body = json.loads(bytes(raw))
        if not isinstance(body, dict) or body.pop("format", None) != LINEAR_FORMAT:
            raise ValueError(f"not a {LINEAR_FORMAT} model")
        model = cls(**body)
        if len(model.weights) != len(model.design_columns()):
            raise ValueError(f"{len(model.weights)} weights for {len(model.design_columns())} design columns")
        return model


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free logistic


def design_matrix(
    frame: pd.DataFrame, features: list[str], numeric: dict[str, list[float]], onehot: dict[str, int]
) -> np.ndarray:
    """The linear model's inputs: standardised numerics (missing -> 0, the mean) and one-hot codes."""
    n = len(frame)
    width = len(numeric) + sum(onehot.values())
    out = np.zeros((n, width), dtype="float64")
    j = 0
    for f in features:
        if f in numeric:
            mean, std = numeric[f]
            x = (
                pd.to_numeric(frame[f], errors="coerce").to_numpy(dtype="float64", na_value=np.nan) - mean
            ) / std
            out[:, j] = np.where(np.isfinite(x), x, 0.0)
            j += 1
    for f in features:
        k = onehot.get(f, 0)
        if not k:
            continue
        codes = frame[f].to_numpy(dtype="float64", na_value=np.nan)
        ok = np.isfinite(codes) & (codes >= 0) & (codes < k)
        rows = np.nonzero(ok)[0]
        out[rows, j + codes[ok].astype(int)] = 1.0
        j += k
    return out


# --- distributed fit ----------------------------------------------------------------------


def _part_stats(part: pd.DataFrame, cols: list[str]) -> np.ndarray:
    x = part[cols].to_numpy(dtype="float64", na_value=np.nan)
    ok = np.isfinite(x)
    x0 = np.where(ok, x, 0.0)
    return np.stack([ok.sum(axis=0), x0.sum(axis=0), (x0 * x0).sum(axis=0)])


def _part_design(
    part: pd.DataFrame,
    label: str,
    features: list[str],
    numeric: dict[str, list[float]],
    onehot: dict[str, int],
) -> tuple[np.ndarray, np.ndarray]:
    return design_matrix(part, features, numeric, onehot), part[label].to_numpy(dtype="float64")


def _part_loss_grad(xy: tuple[np.ndarray, np.ndarray], w: np.ndarray) -> tuple[float, np.ndarray, int]:
    """Summed log loss and its gradient over one partition; ``w[-1]`` is the intercept."""
    x, y = xy
    if not len(y):
        return 0.0, np.zeros_like(w), 0
    z = x @ w[:-1] + w[-1]
    loss = float(np.sum(np.logaddexp(0.0, z) - y * z))
    r = _sigmoid(z) - y
    return loss, np.append(x.T @ r, r.sum()), len(y)


def _reduce(client: Any, parts: list[Any], fn: Callable[..., Any], *args: Any) -> list[Any]:
    """Run ``fn(part, *args)`` where each partition lives; results in partition order (a deterministic
    sum)."""
    futures = [client.submit(fn, p, *args, pure=False) for p in parts]
    return client.gather(futures)


@dataclass(frozen=True)
class LinearFit:
    model: LinearModel
    best_iteration: int
    valid_logloss: float
    iterations: int


def fit_linear(
    client: Any,
    train_parts: list[Any],
    valid_parts: list[Any],
    features: list[str],
    categorical: list[str],
    n_categories: dict[str, int],
    label: str,
    params: LinearParams,
    workers: list[str] | None = None,
) -> LinearFit:
    """Fit on partitions (Dask futures of pandas frames, encoded) without bringing the data to the client.

    Each L-BFGS step is one map-reduce (loss + gradient per partition, summed in
    partition order, so a rerun gives the same weights); after each step the
    validation log loss decides early stopping and the best step is kept.
    """
    from scipy.optimize import minimize

    where = {"workers": workers, "allow_other_workers": False} if workers else {}
    numeric_cols = [f for f in features if f not in categorical]
    stats = sum(
        client.gather([client.submit(_part_stats, p, numeric_cols, pure=False, **where) for p in train_parts])
    )
    count, total, squares = stats
    numeric: dict[str, list[float]] = {}
    for i, col in enumerate(numeric_cols):
        n = max(float(count[i]), 1.0)
        mean = float(total[i]) / n
        std = math.sqrt(max(float(squares[i]) / n - mean * mean, 0.0))
        numeric[col] = [mean, std if std > 1e-12 else 1.0]
    onehot = {c: int(n_categories[c]) for c in features if c in categorical}

    def design(parts: list[Any]) -> list[Any]:
        return [
            client.submit(_part_design, p, label, features, numeric, onehot, pure=False, **where)
            for p in parts
        ]

    train_xy, valid_xy = design(train_parts), design(valid_parts)
    n_train = sum(
        client.gather([client.submit(lambda xy: len(xy[1]), p, pure=False, **where) for p in train_xy])
    )
    n_valid = sum(
        client.gather([client.submit(lambda xy: len(xy[1]), p, pure=False, **where) for p in valid_xy])
    )
    if not n_train or not n_valid:
        raise ValueError(f"linear model: empty training ({n_train}) or validation ({n_valid}) slice")
    width = len(numeric) + sum(onehot.values())

    def loss_grad(w: np.ndarray, parts: list[Any], n: int, penalty: float) -> tuple[float, np.ndarray]:
        futures = [client.submit(_part_loss_grad, p, w, pure=False, **where) for p in parts]
        loss, grad = 0.0, np.zeros_like(w)
        for part_loss, part_grad, _ in client.gather(futures):
            loss += part_loss
            grad += part_grad
        loss, grad = loss / n, grad / n
        if penalty:
            loss += 0.5 * penalty * float(w[:-1] @ w[:-1])
            grad[:-1] += penalty * w[:-1]
        return loss, grad

    w0 = np.zeros(width + 1)
    best = {"loss": loss_grad(w0, valid_xy, n_valid, 0.0)[0], "w": w0, "it": 0}
    state = {"it": 0, "since": 0}

    def on_step(intermediate_result: Any) -> None:  # scipy passes an OptimizeResult to this name
        state["it"] += 1
        v = loss_grad(np.asarray(intermediate_result.x), valid_xy, n_valid, 0.0)[0]
        if v < best["loss"] - 1e-12:
            best.update(loss=v, w=np.array(intermediate_result.x), it=state["it"])
            state["since"] = 0
        else:
            state["since"] += 1
            if state["since"] >= params.early_stopping_rounds:
                raise StopIteration  # scipy >= 1.11 ends the minimisation here

    minimize(
        loss_grad,
        w0,
        args=(train_xy, n_train, params.l2),
        jac=True,
        method="L-BFGS-B",
        callback=on_step,
        options={"maxiter": params.max_iter, "gtol": params.tol},
    )
    for f in (*train_xy, *valid_xy):
        f.release()
    w = best["w"]
    model = LinearModel(
        features=list(features),
        numeric=numeric,
        onehot=onehot,
        weights=[float(v) for v in w[:-1]],
        bias=float(w[-1]),
        params=asdict(params),
    )
    return LinearFit(model, int(best["it"]), float(best["loss"]), int(state["it"]))
