"""Storage benchmarks, ratios measured in one run (this machine is noisy; absolute seconds are context only).

    python -m benchmarks.storage [--max-rows N] [--json PATH]

- ingest_vs_pyarrow: rows/s of the ingest stage (typed, validated, quarantine,
  checksummed manifest) over a bare pyarrow read -> parquet write of the same
  source files (goal >= 0.8).
- rerun_vs_first: wall time of the stages rerun with unchanged inputs (every
  committed version found) over the first run (goal <= 0.1).
- s3_vs_local: the stages end to end on moto's S3 server over local disk.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


def bare_pyarrow(source: Path, out: Path) -> tuple[float, int]:
    """What a hand-written copy would do: read each table, write it as parquet. No types, checks or
    manifests."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = 0
    for path in sorted(source.iterdir()):
        if path.suffix == ".zip":
            table = pa.Table.from_pandas(pd.read_csv(path, low_memory=False), preserve_index=False)
        else:
            table = pacsv.read_csv(path)
        rows += table.num_rows
        pq.write_table(table, out / (path.name.split(".")[0] + ".parquet"))
    return time.perf_counter() - started, rows


def stages(store, client, max_rows):
    from conveyor.tasks import clean, evaluate, ingest, train

    t0 = time.perf_counter()
    ingested = ingest.ingest(store, client, None, ingest.IngestParams(max_rows=max_rows))
    t_ingest = time.perf_counter() - t0
    cleaned = clean.clean(store, ingested, client)
    trained = train.train(store, cleaned, client)
    evaluate.evaluate(store, cleaned, trained, client)
    rows = sum(t.rows_read for t in ingested.tables.values())
    return time.perf_counter() - t0, t_ingest, rows, trained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-rows", type=int, default=None, help="sample of flights (default: all)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import logging

    from distributed import Client, LocalCluster
    from moto.server import ThreadedMotoServer

    from conveyor.cluster import quiet_dask_logs

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request access log
    quiet_dask_logs()

    from conveyor.prefect_api import free_port
    from conveyor.store.storage import Store
    from conveyor.tasks.ingest import packaged_source_url

    work = Path(tempfile.mkdtemp(prefix="conveyor-bench-"))
    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    try:
        with (
            LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster,
            Client(cluster) as client,
        ):
            source = Path(packaged_source_url().removeprefix("file://"))
            bare_s, bare_rows = bare_pyarrow(source, work / "bare")

            # Warm the workers (imports, first-task costs) so the first run measures the work, not start-up.
            stages(Store.from_url(str(work / "warm")), client, 20_000)
            local = Store.from_url(str(work / "local"))
            first_s, ingest_s, rows, trained = stages(local, client, args.max_rows)
            rerun_s, _, _, again = stages(local, client, args.max_rows)
            assert again.reused and again.version == trained.version

            import s3fs

            options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "bench", "secret": "bench"}
            s3fs.S3FileSystem(**options).mkdir("bench")
            s3 = Store.from_url("s3://bench/root", options)
            s3_s, s3_ingest_s, _, s3_trained = stages(s3, client, args.max_rows)
            assert s3_trained.version == trained.version
    finally:
        moto.stop()
        shutil.rmtree(work, ignore_errors=True)

    result = {
        "rows": rows,
        "ingest_vs_pyarrow": round((rows / ingest_s) / (bare_rows / bare_s), 3),
        "rerun_vs_first": round(rerun_s / first_s, 3),
        "s3_vs_local": round(s3_s / first_s, 3),
        "s3_ingest_vs_local_ingest": round(s3_ingest_s / ingest_s, 3),
        "seconds": {
            "bare_pyarrow": round(bare_s, 2),
            "ingest": round(ingest_s, 2),
            "first_run": round(first_s, 2),
            "rerun": round(rerun_s, 2),
            "s3_run": round(s3_s, 2),
        },
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
