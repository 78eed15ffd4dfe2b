"""Storage benchmarks, ratios measured in one run (this machine is noisy; absolute seconds are context only).

    python -m benchmarks.storage [--max-rows N] [--json PATH]
    python -m benchmarks.storage --ingest-only [--rows N | --source-url FOLDER] [--json PATH]

- ingest_vs_pyarrow: rows/s of the ingest stage (typed, validated, quarantine,
  checksummed manifest) over a bare pyarrow read -> parquet write of the same
  source files (goal >= 0.8). ``--ingest-only`` measures just this, on the
  flagship data, on ``--rows N`` synthetic flights (benchmarks/synth.py, made
  once under ``--work``) or on a source folder already made.
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
    """What a hand-written copy would do: read each table (a CSV, a zipped CSV, a parquet file or a folder
    of parquet parts) with pyarrow, write it as parquet. No types, checks or manifests."""
    import zipfile

    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = 0
    for path in sorted(source.iterdir()):
        name = path.name.split(".")[0]
        if path.is_dir():
            (out / name).mkdir(exist_ok=True)
            for part in sorted(path.glob("*.parquet")):
                table = pq.read_table(part)
                rows += table.num_rows
                pq.write_table(table, out / name / part.name)
            continue
        if path.suffix == ".zip":
            with zipfile.ZipFile(path) as archive, archive.open(archive.namelist()[0]) as fh:
                table = pacsv.read_csv(fh)
        elif path.suffix == ".parquet":
            table = pq.read_table(path)
        else:
            table = pacsv.read_csv(path)
        rows += table.num_rows
        pq.write_table(table, out / (name + ".parquet"))
    return time.perf_counter() - started, rows


def ingest_only(client, work: Path, source: Path, repeat: int) -> dict:
    """Ingest rows/s over the bare copy's, best of ``repeat`` runs each, alternated in one process."""
    from conveyor.store.storage import Store
    from conveyor.tasks import ingest

    # Warm the workers (imports, first-task costs) so the runs measure the work, not start-up.
    ingest.ingest(Store.from_url(str(work / "warm")), client, None, ingest.IngestParams(max_rows=20_000))
    bare, timed = [], []
    for i in range(repeat):
        bare_s, bare_rows = bare_pyarrow(source, work / f"bare-{i}")
        bare.append(bare_s)
        t0 = time.perf_counter()
        ingested = ingest.ingest(Store.from_url(str(work / f"store-{i}")), client, source.as_uri())
        timed.append(time.perf_counter() - t0)
        assert not ingested.reused
        shutil.rmtree(work / f"bare-{i}", ignore_errors=True)
        shutil.rmtree(work / f"store-{i}", ignore_errors=True)
    rows = sum(t.rows_read for t in ingested.tables.values())
    assert rows == bare_rows, (rows, bare_rows)
    return {
        "rows": rows,
        "ingest_vs_pyarrow": round((rows / min(timed)) / (bare_rows / min(bare)), 3),
        "rows_quarantined": ingested.rows_quarantined,
        "seconds": {"bare_pyarrow": [round(s, 2) for s in bare], "ingest": [round(s, 2) for s in timed]},
    }


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
    parser.add_argument("--ingest-only", action="store_true", help="measure only ingest_vs_pyarrow")
    parser.add_argument(
        "--rows",
        type=lambda s: int(s.replace("_", "")),
        default=None,
        help="--ingest-only: synthetic flights (default: the flagship data)",
    )
    parser.add_argument("--source-url", default=None, help="--ingest-only: a source folder already made")
    parser.add_argument("--work", default=None, help="where synthetic data is kept between runs")
    parser.add_argument("--repeat", type=int, default=1, help="--ingest-only: runs of each, best taken")
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

    if args.ingest_only:
        from benchmarks.common import emit, synthetic_source

        work = Path(tempfile.mkdtemp(prefix="conveyor-bench-"))
        if args.source_url:
            source = Path(args.source_url.removeprefix("file://"))
        elif args.rows:
            source = synthetic_source(Path(args.work) if args.work else work, args.rows)
        else:
            source = Path(packaged_source_url().removeprefix("file://"))
        try:
            with (
                LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster,
                Client(cluster) as client,
            ):
                result = ingest_only(client, work, source, args.repeat)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        emit(result, args.json)
        return

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
