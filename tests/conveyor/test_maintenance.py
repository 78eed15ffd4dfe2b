"""verify / gc / backup / restore / replicas on real committed versions, locally and on S3 (moto)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conveyor.store.maintenance import Version, copy_root, gc, replicate, verify
from conveyor.store.storage import StorageError, Store, committed, read_dataset_pandas
from conveyor.tasks import ingest
from tests.support import REPO_ROOT

ROOT = REPO_ROOT


def test_verify_passes_on_a_fresh_root(pipeline_run) -> None:
    report = verify(pipeline_run.store)
    assert report.ok, report.problems
    assert report.checked >= 13  # 5 bronze + 5 bronze quarantine + silver + its quarantine + the model


def test_backup_restore_roundtrip_is_idempotent(pipeline_run, tmp_path) -> None:
    backup = Store.from_url(str(tmp_path / "backup"))
    first = copy_root(pipeline_run.store, backup)
    assert (
        first.ok and first.copied and first.aliases >= 1
    )  # the champion pointer (more if other tests moved aliases)
    again = copy_root(pipeline_run.store, backup)
    assert again.copied == [] and sorted(again.skipped) == sorted(first.copied)  # resumable: nothing redone

    restored = Store.from_url(str(tmp_path / "restored"))
    back = copy_root(backup, restored)
    assert back.ok and sorted(back.copied) == sorted(first.copied)
    assert verify(restored).ok
    silver = pipeline_run.cleaned.silver
    url = restored.dataset_url(silver.name, silver.version)
    assert len(read_dataset_pandas(restored, url)) == silver.rows
    champion = (
        Path(restored.path(restored.root))
        / "models"
        / pipeline_run.trained.model
        / "aliases"
        / "champion.json"
    )
    assert champion.exists()


def test_interrupted_backup_resumes(pipeline_run, tmp_path) -> None:
    backup = Store.from_url(str(tmp_path / "backup"))
    copy_root(pipeline_run.store, backup, names={"silver_flights"})
    silver = pipeline_run.cleaned.silver
    # Simulate a copy that died after the parts, before the manifest.
    os.remove(backup.path(backup.url("datasets", "silver_flights", silver.version, "_manifest.json")))
    assert committed(backup, "silver_flights", silver.version) is None
    report = copy_root(pipeline_run.store, backup, names={"silver_flights"})
    assert f"datasets/silver_flights/{silver.version}" in report.copied
    assert verify(backup).ok


def test_verify_catches_a_corrupted_replica_on_s3(pipeline_run, s3_options) -> None:
    replica = Store.from_url("s3://conveyor-test/replica", s3_options)
    silver = pipeline_run.cleaned.silver
    rel = f"datasets/silver_flights/{silver.version}"
    reports = replicate(
        pipeline_run.store,
        [replica],
        [rel, f"models/{pipeline_run.trained.model}/{pipeline_run.trained.version}"],
    )
    assert reports[replica.root].ok and len(reports[replica.root].copied) == 2
    assert verify(replica).ok

    part = sorted(replica.fs.glob(replica.path(replica.url(rel, "part-*.parquet"))))[0]
    data = bytearray(replica.fs.cat_file(part))
    data[100] ^= 0xFF  # same size, different bytes: only the checksum can tell
    replica.fs.pipe_file(part, bytes(data))

    report = verify(replica)
    assert list(report.problems) == [rel]
    assert "checksum does not match" in report.problems[rel][0]
    assert verify(replica, checksums=False).ok  # a size-only check would have missed it
    # The corrupted copy is repaired by re-replicating, and never spread further.
    with pytest.raises(ValueError, match="source does not match"):
        from conveyor.store.maintenance import copy_version

        copy_version(
            replica,
            Store.from_url("memory://elsewhere"),
            Version("datasets", "silver_flights", silver.version),
        )
    replicate(pipeline_run.store, [replica], [rel])
    assert verify(replica).ok


def test_crash_between_parts_and_manifest_leaves_nothing_visible(tmp_path, small_source, dask_client) -> None:
    """A process killed (SIGKILL) after writing parts, before the manifest."""
    store_dir = tmp_path / "store"
    script = textwrap.dedent(f"""
        import os, signal
        from distributed import Client
        import conveyor.tasks.ingest as ing
        def die(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        ing.commit_dataset = die
        if __name__ == "__main__":
            with Client({dask_client.scheduler.address!r}) as client:
                ing.ingest(ing.Store.from_url({str(store_dir)!r}), client, {small_source.as_uri()!r})
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -9, proc.stderr[-2000:]

    store = Store.from_url(str(store_dir))
    parts = list(store_dir.glob("**/part-*.parquet"))
    assert parts, "the crash should have happened after some parts were written"
    version_dir = parts[0].parent
    assert committed(store, version_dir.parent.name, version_dir.name, version_dir.as_uri()) is None
    with pytest.raises(StorageError, match="never committed"):
        read_dataset_pandas(store, version_dir.as_uri())
    assert verify(store).checked == 0  # nothing looks complete

    listed = gc(store, min_age_s=0)
    assert not listed.removed and {Path(o.path).name for o in listed.orphans} >= {p.name for p in parts}
    assert all(p.exists() for p in parts)  # dry run by default
    assert gc(store, min_age_s=3600).orphans == []  # young files may belong to a running writer

    # A rerun completes over the leftovers; then gc removes nothing that is committed.
    result = ingest.ingest(store, dask_client, small_source.as_uri())
    assert result.tables["flights"].rows_read == 5_000
    assert verify(store).ok
    assert gc(store, min_age_s=0).orphans == []
