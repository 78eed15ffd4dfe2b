"""Train in worker memory (``xgboost.dask``) vs from external memory on the same silver data, then evaluate.

    python -m benchmarks.external_memory --rows 10_000_000 [--rounds 60] [--workers 2] [--keep DIR]

Synthetic flights (benchmarks/synth.py) are ingested and cleaned once; then
each engine trains the default gbtree (forced by ``external_memory_rows``) and
the model is evaluated on the holdout. Per engine: seconds and the peak RSS of
the whole process tree (Dask workers included) for train and for evaluate, the
kept round and the holdout AUC. The goal is the same AUC within 0.002.

With early stopping (the default) the validation month picks the round, and that pick moves with the
seed by more than the engines differ; ``--rounds N`` trains both engines N rounds with no early stop
(patience N), so they are compared on the same amount of boosting; ``--no-sampling`` also turns row and
column subsampling off (each engine draws its own random rows: one process vs one draw per worker).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.scale import PeakRss

ENGINES = {"dask": 10**15, "external_memory": 0}  # engine -> external_memory_rows that picks it


def train_seed() -> int:
    from conveyor.tasks.train import TrainParams

    return TrainParams().seed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=lambda s: int(s.replace("_", "")), default=10_000_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=train_seed(), help="the booster's seed (row sampling)")
    parser.add_argument("--rounds", type=int, default=None, help="train N rounds, no early stopping")
    parser.add_argument("--no-sampling", action="store_true", help="subsample and colsample_bytree 1.0")
    parser.add_argument("--keep", default=None, help="folder to keep generated data in (reused when present)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from distributed import Client, LocalCluster

    from benchmarks.synth import generate
    from conveyor.cluster import quiet_dask_logs
    from conveyor.store.storage import Store
    from conveyor.tasks import clean, evaluate, ingest, train

    quiet_dask_logs()
    work = Path(args.keep or tempfile.mkdtemp(prefix="conveyor-extmem-"))
    store_dir = work / f"store-extmem-{args.rows}"
    result: dict = {
        "rows": args.rows,
        "workers": args.workers,
        "seed": args.seed,
        "rounds": args.rounds or "early stopping",
        "sampling": not args.no_sampling,
        "engines": {},
    }
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
            source = work / f"synth-{args.rows}"
            if not (source / "airports.parquet").exists():
                generate(str(source), args.rows)
            store = Store.from_url(str(store_dir))
            ingested = ingest.ingest(store, client, source.as_uri())
            cleaned = clean.clean(store, ingested, client)
            for engine, threshold in ENGINES.items():
                fixed = {}
                if args.rounds:  # no early stop: patience as long as the training
                    fixed = {"num_boost_round": args.rounds, "early_stopping_rounds": args.rounds}
                if args.no_sampling:
                    fixed |= {"subsample": 1.0, "colsample_bytree": 1.0}
                params = train.TrainParams(seed=args.seed, external_memory_rows=threshold, **fixed)
                figures = {}
                with PeakRss() as rss:
                    started = time.perf_counter()
                    trained = train.train(store, cleaned, client, params, model=f"flights_{engine}")
                    figures["train_s"] = round(time.perf_counter() - started, 1)
                assert trained.engine == engine, trained.engine
                figures["train_peak_rss_gib"] = round(rss.peak / 2**30, 2)
                with PeakRss() as rss:
                    started = time.perf_counter()
                    evaluation = evaluate.evaluate(store, cleaned, trained, client)
                    figures["evaluate_s"] = round(time.perf_counter() - started, 1)
                figures["evaluate_peak_rss_gib"] = round(rss.peak / 2**30, 2)
                figures |= {
                    "best_iteration": trained.best_iteration,
                    "valid_auc": round(trained.valid_auc, 4),
                    "holdout_auc": round(evaluation.metrics.roc_auc, 4),
                    "train_rows": trained.train_rows,
                    "valid_rows": trained.valid_rows,
                }
                result["engines"][engine] = figures
                print(json.dumps({"engine": engine, **figures}), flush=True)
    finally:
        shutil.rmtree(store_dir, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    mem, ext = result["engines"]["dask"], result["engines"]["external_memory"]
    result["holdout_auc_difference"] = round(ext["holdout_auc"] - mem["holdout_auc"], 4)
    result["train_peak_rss_ratio"] = round(ext["train_peak_rss_gib"] / mem["train_peak_rss_gib"], 2)
    result["train_seconds_ratio"] = round(ext["train_s"] / mem["train_s"], 2)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
