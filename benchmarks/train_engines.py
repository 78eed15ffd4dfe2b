"""Train engines: ``xgboost.dask`` on the cluster vs single-process ``xgboost.train``, same data, params
and threads.

    python -m benchmarks.train_engines --rows 10_000_000 [--workers 2] [--keep DIR] [--json PATH]

Ingest and clean run once (not timed) on synthetic flights. Then the same
train/valid slices and the same parameters (``TrainParams()``: 400 rounds max,
early stopping 25) are trained

* ``dask``: as the pipeline does (``conveyor.tasks.train.fit`` on frames spread over the workers);
* ``single``: ``xgboost.train`` in this process on the same rows loaded into pandas, with
  ``nthread`` = the cluster's total worker threads (the workers sit idle meanwhile);
* ``cuda`` (only where a GPU is visible): the single-process train with ``device="cuda"``.

Prints JSON with seconds, the ratio dask/single (goal <= 1.2) and each validation AUC.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=lambda s: int(s.replace("_", "")), default=1_000_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--keep", default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import xgboost as xgb
    from distributed import Client, LocalCluster
    from sklearn.metrics import roc_auc_score

    from benchmarks.common import synthetic_source
    from conveyor import resources
    from conveyor.cluster import quiet_dask_logs
    from conveyor.store.storage import Store
    from conveyor.tasks import clean, ingest, train

    quiet_dask_logs()
    work = Path(args.keep or tempfile.mkdtemp(prefix="conveyor-engines-"))
    source = synthetic_source(work, args.rows)
    out: dict = {"rows": args.rows, "workers": args.workers}
    try:
        with (
            LocalCluster(
                n_workers=args.workers,
                threads_per_worker=1,
                dashboard_address=":0",
                local_directory=str(work / "dask"),
            ) as cluster,
            Client(cluster) as client,
        ):
            store = Store.from_url((work / "store").as_uri())
            cleaned = clean.clean(store, ingest.ingest(store, client, source.as_uri()), client)
            LABEL = cleaned.schema.label  # noqa: N806 (the label column, from the silver schema)
            params, split = train.TrainParams(), train.SplitParams()
            features = cleaned.features
            nthread = sum(w["nthreads"] for w in client.scheduler_info(n_workers=-1)["workers"].values())

            t0 = time.perf_counter()
            frames, rows = train.load_frames(store, client, cleaned, split)
            fitted = train.fit(client, frames, features, cleaned.categories, params, "cpu")
            dask_s = time.perf_counter() - t0
            del frames

            t0 = time.perf_counter()
            local = {
                p: train.load_split(store, cleaned.silver.url, split, p, [*features, LABEL]).compute()
                for p in ("train", "valid")
            }
            load_s = time.perf_counter() - t0

            def single(device: str) -> tuple[float, float, int]:
                t = time.perf_counter()
                types = train.feature_types(features)
                dtrain = xgb.QuantileDMatrix(
                    local["train"][features],
                    local["train"][LABEL],
                    feature_types=types,
                    enable_categorical=True,
                    nthread=nthread,
                )
                dvalid = xgb.QuantileDMatrix(
                    local["valid"][features],
                    local["valid"][LABEL],
                    feature_types=types,
                    enable_categorical=True,
                    nthread=nthread,
                    ref=dtrain,
                )
                booster = xgb.train(
                    train.xgb_params(params, device) | {"nthread": nthread},
                    dtrain,
                    num_boost_round=params.num_boost_round,
                    evals=[(dvalid, "valid")],
                    early_stopping_rounds=params.early_stopping_rounds,
                    verbose_eval=False,
                )
                seconds = time.perf_counter() - t
                best = int(booster.best_iteration)
                p = booster.inplace_predict(local["valid"][features], iteration_range=(0, best + 1))
                return seconds, float(roc_auc_score(local["valid"][LABEL], p)), best

            single_s, single_auc, single_best = single("cpu")
            exact_dask_auc = float(
                roc_auc_score(local["valid"][LABEL], fitted.model.inplace_predict(local["valid"][features]))
            )
            out |= {
                "train_rows": rows["train"],
                "valid_rows": rows["valid"],
                "threads": nthread,
                "dask": {
                    "seconds": round(dask_s, 2),
                    "valid_auc_xgboost": round(fitted.valid_auc, 5),
                    "valid_auc_exact": round(exact_dask_auc, 5),
                    "rounds": fitted.best_iteration + 1,
                },
                "single": {
                    "seconds": round(single_s, 2),
                    "load_to_pandas_s": round(load_s, 2),
                    "valid_auc": round(single_auc, 5),
                    "rounds": single_best + 1,
                },
                "ratio_dask_over_single": round(dask_s / single_s, 3),
                "ratio_dask_over_single_with_load": round(dask_s / (single_s + load_s), 3),
            }
            if resources.gpu_count():
                cuda_s, cuda_auc, cuda_best = single("cuda")
                out["cuda"] = {
                    "seconds": round(cuda_s, 2),
                    "valid_auc": round(cuda_auc, 5),
                    "rounds": cuda_best + 1,
                    "speedup_vs_cpu_single": round(single_s / cuda_s, 2),
                }
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            shutil.rmtree(work / "store", ignore_errors=True)
    from benchmarks.common import emit

    return emit(out, args.json)


if __name__ == "__main__":
    main()
