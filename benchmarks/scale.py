"""Per-stage throughput at several sizes of synthetic flights, with the peak RSS of the whole process tree.

    python -m benchmarks.scale --rows 1_000_000 10_000_000 [--workers 2] [--json PATH]

For each size: generate the data (benchmarks/synth.py, not timed), then run
ingest -> clean -> train -> evaluate directly on one LocalCluster and report
rows/s per stage and how throughput scales against the smallest size
(1.0 = linear).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import psutil


class PeakRss:
    """Samples the summed RSS of this process and all its children (Dask workers included)."""

    def __init__(self, every_s: float = 0.5):
        self.every_s = every_s
        self.peak = 0
        self.stage_peak = 0  # since the last start_stage()
        self.by_process: dict[int, tuple[str, int]] = {}  # pid -> (what it runs, its own peak RSS)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    rss = proc.memory_info().rss
                    if proc.pid not in self.by_process:
                        self.by_process[proc.pid] = (_describe(proc), 0)
                except psutil.Error:
                    continue
                total += rss
                what, peak = self.by_process[proc.pid]
                self.by_process[proc.pid] = (what, max(peak, rss))
            self.peak = max(self.peak, total)
            self.stage_peak = max(self.stage_peak, total)
            self._stop.wait(self.every_s)

    def start_stage(self) -> None:
        """Start a new per-stage peak (the overall peak is kept)."""
        self.stage_peak = 0

    def top(self, n: int = 6) -> list[dict]:
        """The processes with the highest peak RSS (each its own peak, not at the same moment)."""
        ranked = sorted(self.by_process.items(), key=lambda kv: -kv[1][1])[:n]
        return [
            {"pid": pid, "what": what, "peak_rss_gib": round(peak / 2**30, 2)} for pid, (what, peak) in ranked
        ]

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _describe(proc: psutil.Process) -> str:
    """A short name for a process of the tree: a Dask worker, the Prefect server, the flow, ..."""
    line = " ".join(proc.cmdline())
    for marker, name in (
        ("spawn_main", "dask worker (spawned)"),
        ("prefect server", "prefect server"),
        ("uvicorn", "prefect server (uvicorn)"),
        ("conveyor run", "conveyor run (flow, scheduler)"),
    ):
        if marker in line:
            return name
    return line[:80]


def run_stages(store, client, source_url: str, rows: int = 0, rss: PeakRss | None = None) -> dict[str, float]:
    """The four stages directly on ``client``; each stage's figures are printed as soon as it ends."""
    from conveyor.tasks import clean, evaluate, ingest, train

    seconds: dict[str, float] = {}

    def timed(stage: str, fn, *args):
        if rss:
            rss.start_stage()
        t = time.perf_counter()
        result = fn(*args)
        seconds[stage] = time.perf_counter() - t
        progress = {
            "rows": rows,
            "stage": stage,
            "seconds": round(seconds[stage], 1),
            "rows_per_s": round(rows / seconds[stage]) if rows else None,
            "stage_peak_rss_gib": round(rss.stage_peak / 2**30, 2) if rss else None,
            "peak_rss_gib_so_far": round(rss.peak / 2**30, 2) if rss else None,
        }
        print(json.dumps(progress), flush=True)
        return result

    ingested = timed("ingest", ingest.ingest, store, client, source_url)
    cleaned = timed("clean", clean.clean, store, ingested, client)
    trained = timed("train", train.train, store, cleaned, client)
    evaluation = timed("evaluate", evaluate.evaluate, store, cleaned, trained, client)
    seconds["holdout_auc"] = evaluation.metrics.roc_auc
    seconds["quarantined"] = cleaned.quarantine.rows
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", type=lambda s: int(s.replace("_", "")), default=[1_000_000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-limit", default="auto", help="per Dask worker (spills to disk past 70%%)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--keep", default=None, help="folder to keep generated data in (reused when present)")
    args = parser.parse_args()

    from distributed import Client, LocalCluster

    from benchmarks.synth import generate
    from conveyor.cluster import quiet_dask_logs
    from conveyor.store.storage import Store

    quiet_dask_logs()
    work = Path(args.keep or tempfile.mkdtemp(prefix="conveyor-scale-"))
    results = []
    try:
        with (
            LocalCluster(
                n_workers=args.workers,
                threads_per_worker=1,
                memory_limit=args.memory_limit,
                dashboard_address=":0",
                local_directory=str(work / "dask"),
            ) as cluster,
            Client(cluster) as client,
        ):
            for rows in sorted(args.rows):
                source = work / f"synth-{rows}"
                if not (source / "airports.parquet").exists():
                    generate(str(source), rows)
                store = Store.from_url(str(work / f"store-{rows}"))
                with PeakRss() as rss:
                    started = time.perf_counter()
                    seconds = run_stages(store, client, source.as_uri(), rows, rss)
                    total = time.perf_counter() - started
                shutil.rmtree(work / f"store-{rows}", ignore_errors=True)
                stages = ("ingest", "clean", "train", "evaluate")
                results.append(
                    {
                        "rows": rows,
                        "total_s": round(total, 1),
                        "rows_per_s": {s: round(rows / seconds[s]) for s in stages},
                        "seconds": {s: round(seconds[s], 1) for s in stages},
                        "peak_rss_gib": round(rss.peak / 2**30, 2),
                        "holdout_auc": round(seconds["holdout_auc"], 4),
                        "quarantined": seconds["quarantined"],
                    }
                )
                print(json.dumps(results[-1]), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    base = results[0]
    summary = {
        "workers": args.workers,
        "sizes": results,
        "scaling_vs_smallest": {  # throughput ratio: 1.0 = linear, < 1 = slower per row at scale
            str(r["rows"]): {
                s: round(r["rows_per_s"][s] / base["rows_per_s"][s], 2) for s in base["rows_per_s"]
            }
            for r in results[1:]
        },
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
