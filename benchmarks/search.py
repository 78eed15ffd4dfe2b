"""A parallel search vs the same candidates trained one after another, on one cluster and the flagship data.

    python -m benchmarks.search [--budget 6] [--workers 2] [--max-rows N] [--json PATH]

Ingest and clean run once (not timed). Then, on the same LocalCluster:

* ``parallel``: ``run_search`` with one slot per worker;
* ``sequential_slots``: the same candidates, one slot at a time (``parallelism=1``): what the
  search would cost without using the free slots (ideal ratio = number of slots);
* ``sequential_cluster``: the same candidates trained one by one by ``train()``, each spread
  over the whole cluster (the plain training path);

and the winner's holdout AUC (evaluate) against the default gbtree's. Prints JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-rows", type=int, default=None)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from distributed import Client, LocalCluster

    from conveyor.cluster import quiet_dask_logs
    from conveyor.store.storage import Store
    from conveyor.tasks import clean, evaluate, ingest, search, train

    quiet_dask_logs()
    out: dict = {"budget": args.budget, "workers": args.workers}
    with (
        tempfile.TemporaryDirectory(prefix="conveyor-search-bench-") as tmp,
        LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        store = Store.from_url(Path(tmp).as_uri())
        ingested = ingest.ingest(store, client, None, ingest.IngestParams(max_rows=args.max_rows))
        cleaned = clean.clean(store, ingested, client)
        out["silver_rows"] = cleaned.silver.rows
        base = train.TrainParams()
        params = search.SearchParams(budget=args.budget, seed=args.seed)
        todo = search.candidates(params, base)

        t0 = time.perf_counter()
        winner = search.run_search(store, cleaned, client, params, base, model="bench_parallel")
        parallel_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        one_slot = search.run_search(
            store, cleaned, client, dataclasses.replace(params, parallelism=1), base, model="bench_one_slot"
        )
        sequential_slots_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        whole = [train.train(store, cleaned, client, p, model=f"bench_seq_{i}") for i, p in enumerate(todo)]
        sequential_cluster_s = time.perf_counter() - t0

        default = next(t for t, p in zip(whole, todo, strict=False) if p.identity() == base.identity())
        winner_eval = evaluate.evaluate(store, cleaned, winner, client)
        default_eval = evaluate.evaluate(store, cleaned, default, client)

        out |= {
            "candidates": len(todo),
            "parallel_slots": winner.search["parallelism"],
            "seconds": {
                "parallel": round(parallel_s, 2),
                "sequential_slots": round(sequential_slots_s, 2),
                "sequential_cluster": round(sequential_cluster_s, 2),
            },
            "speedup_vs_sequential_slots": round(sequential_slots_s / parallel_s, 3),
            "speedup_vs_sequential_cluster": round(sequential_cluster_s / parallel_s, 3),
            "same_winner_one_slot": one_slot.search["winner"] == winner.search["winner"],
            "winner": {
                "candidate": winner.search["winner"],
                "family": winner.family,
                "hyperparameters": winner.hyperparameters,
                "valid_auc": round(winner.valid_auc, 5),
                "holdout_auc": round(winner_eval.metrics.roc_auc, 5),
            },
            "default_gbtree": {
                "valid_auc": round(default.valid_auc, 5),
                "holdout_auc": round(default_eval.metrics.roc_auc, 5),
            },
            "baseline_holdout_auc": round(default_eval.baseline.roc_auc, 5),
            "leaderboard": [
                {
                    k: c[k]
                    for k in (
                        "candidate",
                        "family",
                        "valid_auc",
                        "valid_logloss",
                        "best_iteration",
                        "seconds",
                        "slot",
                    )
                }
                | {"hyperparameters": c["hyperparameters"]}
                for c in winner.search["leaderboard"]
            ],
        }
    from benchmarks.common import emit

    return emit(out, args.json)


if __name__ == "__main__":
    main()
