"""Orchestration overhead: the Prefect training flow vs the same stage functions called directly.

    python -m benchmarks.overhead --rows 10_000_000 [--workers 2] [--repeat 1] [--keep DIR] [--json PATH]

Synthetic flights (benchmarks/synth.py, not timed) are generated once. One
LocalCluster serves both sides: ``direct`` runs ingest -> clean -> train ->
evaluate on it (benchmarks/scale.py's ``run_stages``); ``flow`` runs the
``conveyor-training`` flow against a real Prefect API with ``cluster=<that
scheduler address>``. Each side writes to a fresh storage root, so nothing is
reused. The flow also does what the direct calls do not (data and model
monitoring checks, deploy with its gate and card, artifacts), so two ratios are
printed: ``flow_total / direct_total`` and, per stage, the flow's task wall time
(submit to result, Prefect task engine included) over the direct call's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

STAGES = ("ingest", "clean", "train", "evaluate")


def _direct(cluster: Any, work: Path, i: int, source: Path, rows: int) -> tuple[dict, float, Any]:
    from distributed import Client

    from benchmarks.scale import PeakRss, run_stages
    from conveyor.store.storage import Store

    store_dir = work / f"direct-{i}"
    shutil.rmtree(store_dir, ignore_errors=True)
    with PeakRss() as rss, Client(cluster) as client:  # closed before the flow runs: one client at a time
        t0 = time.perf_counter()
        direct = run_stages(Store.from_url(store_dir.as_uri()), client, source.as_uri(), rows)
        total = time.perf_counter() - t0
    shutil.rmtree(store_dir, ignore_errors=True)
    return direct, total, rss


def _flow(cluster: Any, work: Path, i: int, source: Path, training: Any) -> tuple[Any, float, Any]:
    from benchmarks.scale import PeakRss
    from conveyor.flows.params import PipelineParams

    store_dir = work / f"flow-{i}"
    shutil.rmtree(store_dir, ignore_errors=True)
    # The operator's allowances for this benchmark's own store, source and scheduler.
    os.environ["CONVEYOR_ALLOWED_STORAGE_PREFIXES"] = work.as_uri()
    os.environ["CONVEYOR_ALLOWED_SOURCE_PREFIXES"] = work.as_uri()
    os.environ["CONVEYOR_ALLOWED_SCHEDULERS"] = cluster.scheduler_address
    params = PipelineParams(
        storage_url=store_dir.as_uri(), source_url=source.as_uri(), cluster=cluster.scheduler_address
    )
    with PeakRss() as rss:
        t0 = time.perf_counter()
        summary = training(params)
        total = time.perf_counter() - t0
    shutil.rmtree(store_dir, ignore_errors=True)
    return summary, total, rss


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=lambda s: int(s.replace("_", "")), default=1_000_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="alternate direct and flow this many times")
    parser.add_argument(
        "--keep", default=None, help="folder to keep the generated data in (reused when present)"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from distributed import Client, LocalCluster

    from benchmarks.common import synthetic_source
    from conveyor.cluster import quiet_dask_logs
    from conveyor.prefect_api import drain_prefect, ensure_api, export, free_port

    quiet_dask_logs()
    work = Path(args.keep or tempfile.mkdtemp(prefix="conveyor-overhead-"))
    source = synthetic_source(work, args.rows)
    api = ensure_api(work / "prefect-home", free_port())
    export(api)
    runs: list[dict] = []
    try:
        from conveyor.flows.training import training

        with LocalCluster(
            n_workers=args.workers,
            threads_per_worker=1,
            dashboard_address=":0",
            local_directory=str(work / "dask"),
        ) as cluster:
            for i in range(args.repeat):
                # Both sides start on fresh workers (a restart frees what the other side left in worker
                # memory), and the side that goes first alternates: neither inherits warm caches or a
                # dirty heap from the other on every repeat.
                for side in ("direct", "flow") if i % 2 == 0 else ("flow", "direct"):
                    with Client(cluster) as client:
                        client.restart()
                    if side == "direct":
                        direct, direct_total, rss = _direct(cluster, work, i, source, args.rows)
                    else:
                        summary, flow_total, flow_rss = _flow(cluster, work, i, source, training)
                run = {
                    "order": "direct first" if i % 2 == 0 else "flow first",
                    "direct_s": round(direct_total, 2),
                    "flow_s": round(flow_total, 2),
                    "ratio_total": round(flow_total / direct_total, 4),
                    "stages": {
                        s: {
                            "direct_s": round(direct[s], 2),
                            "flow_s": summary.stage_seconds[s],
                            "ratio": round(summary.stage_seconds[s] / direct[s], 4),
                        }
                        for s in STAGES
                    },
                    "four_stages_ratio": round(
                        sum(summary.stage_seconds[s] for s in STAGES) / sum(direct[s] for s in STAGES), 4
                    ),
                    "flow_extra_s": {
                        k: v for k, v in summary.stage_seconds.items() if k not in (*STAGES, "total")
                    },
                    "holdout_auc": {
                        "direct": round(direct["holdout_auc"], 4),
                        "flow": round(summary.metrics["roc_auc"], 4),
                    },
                    "peak_rss_gib": {
                        "direct": round(rss.peak / 2**30, 2),
                        "flow": round(flow_rss.peak / 2**30, 2),
                    },
                }
                runs.append(run)
                print(json.dumps(run), flush=True)
    finally:
        drain_prefect()
        if api.started is not None:
            api.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    out = {
        "rows": args.rows,
        "workers": args.workers,
        "runs": runs,
        "ratio_total_best": min(r["ratio_total"] for r in runs),
        "four_stages_ratio_best": min(r["four_stages_ratio"] for r in runs),
        "ratio_total_median": statistics.median(r["ratio_total"] for r in runs),
        "four_stages_ratio_median": statistics.median(r["four_stages_ratio"] for r in runs),
        "train_ratio_median": statistics.median(r["stages"]["train"]["ratio"] for r in runs),
    }
    from benchmarks.common import emit

    return emit(out, args.json)


if __name__ == "__main__":
    main()
