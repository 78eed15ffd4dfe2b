"""Keys read from a backup or a manifest stay inside their root (issue 16, items 3 and 8).

Crafted backups on local disk and on S3 (a real moto server): ``..`` keys, a symlink
out of the backup, alias pointers at versions that are not there or not verified.
Nothing outside the destination root may change, and every refusal names its key.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest

from conveyor.store.maintenance import copy_root, verify
from conveyor.store.registry import CHAMPION, register_card, set_alias
from conveyor.store.storage import (
    Manifest,
    StorageError,
    Store,
    UnsafeKeyError,
    check_key,
    commit_dataset,
    open_manifest,
    read_dataset_pandas,
    write_bytes_atomic,
    write_json_atomic,
)

MODEL = "tiny_model"


def _dataset(store: Store, name: str = "tiny", version: str = "v1") -> str:
    url = store.dataset_url(name, version)
    store.fs.makedirs(store.path(url), exist_ok=True)
    with store.fs.open(store.path(posixpath.join(url, "part-00000.parquet")), "wb") as fh:
        pd.DataFrame({"x": [1, 2, 3]}).to_parquet(fh)
    commit_dataset(store, name, version, url, lineage={}, parallel=False)
    return url


def _model(store: Store, version: str, payload: bytes = b"not really a booster") -> None:
    """A committed, registered model version: artifact, train.json (the marker) and card."""
    base = store.model_url(MODEL, version)
    write_bytes_atomic(store, posixpath.join(base, "model.ubj"), payload)
    info = {"model_bytes": len(payload), "model_sha256": hashlib.sha256(payload).hexdigest()}
    write_json_atomic(store, posixpath.join(base, "train.json"), info | {"model_file": "model.ubj"})
    register_card(store, MODEL, version, {"model": MODEL, "version": version, "registered_at": version})


def _legit(store: Store) -> None:
    _dataset(store)
    _model(store, "m1")
    set_alias(store, MODEL, CHAMPION, "m1", "test set-up", expected=None, action="promote")


def _victim(tmp_path: Path) -> tuple[Store, Path]:
    """A destination root one level below a folder holding a canary: an escape shows up there."""
    outer = tmp_path / "victim"
    (outer / "root").mkdir(parents=True)
    (outer / "canary.txt").write_text("still here")
    return Store.from_url(str(outer / "root")), outer


def _assert_outer_untouched(outer: Path) -> None:
    assert (outer / "canary.txt").read_text() == "still here"
    assert sorted(p.name for p in outer.iterdir()) == ["canary.txt", "root"]


def test_check_key_refuses_escapes() -> None:
    for key in ("a/b.parquet", "part-00000.parquet", "models/m/v1/card.json"):
        assert check_key(key) == key
    for key in ("", "..", "../x", "a/../../x", "/etc/passwd", "a//b", "a/./b", "a/", "a\\..\\b", "a\x00b", 7):
        with pytest.raises(UnsafeKeyError, match="refused"):
            check_key(key)


def test_restore_from_s3_with_dotdot_keys_touches_nothing_outside_its_root(s3_options, tmp_path) -> None:
    backup = Store.from_url("s3://conveyor-test/backup", s3_options)
    _legit(backup)
    s3, root = backup.fs, "conveyor-test/backup"
    empty = Manifest("x", "y", 0, {}, [], {}, "", "2026-01-01T00:00:00+00:00")
    # 1. A "version" at datasets/../.. whose manifest key exists: the old code rm -r'd dst/datasets/../..
    s3.pipe_file(f"{root}/datasets/../../_manifest.json", json.dumps(asdict(empty)).encode())
    # 2. A version listing a part four levels up, present under exactly that literal key.
    payload = b"written outside the destination root"
    escaping = "../../../../escaped.txt"
    s3.pipe_file(f"{root}/datasets/evil/v1/{escaping}", payload)
    entry = {"path": escaping, "size": len(payload), "sha256": hashlib.sha256(payload).hexdigest(), "rows": 0}
    manifest = asdict(empty) | {"name": "evil", "version": "v1", "files": [entry]}
    s3.pipe_file(f"{root}/datasets/evil/v1/_manifest.json", json.dumps(manifest).encode())
    s3.invalidate_cache()

    dst, outer = _victim(tmp_path)
    report = copy_root(backup, dst)

    _assert_outer_untouched(outer)
    assert not report.ok
    assert "datasets/.." in report.failed and "'datasets/..'" in report.failed["datasets/.."]
    assert "'../../../../escaped.txt'" in report.failed["datasets/evil/v1"]
    assert report.copied == ["datasets/tiny/v1", f"models/{MODEL}/m1"]  # the good versions still come back
    assert verify(dst).ok
    assert not (Path(dst.path(dst.root)) / "models" / MODEL / "aliases").exists()  # no aliases on a failure


def test_restore_refuses_aliases_that_point_at_unverified_versions(tmp_path) -> None:
    backup = Store.from_url(str(tmp_path / "backup"))
    _legit(backup)
    aliases = Path(backup.path(backup.root)) / "models" / MODEL / "aliases"
    pointer = json.loads((aliases / "champion.json").read_text())
    # Pointers at a version that is not in the backup, at a path, and at an uncommitted version...
    (aliases / "ghost.json").write_text(json.dumps(pointer | {"alias": "ghost", "version": "m9"}))
    (aliases / "escape.json").write_text(json.dumps(pointer | {"alias": "escape", "version": "../../../x"}))
    _model(backup, "m3")
    (Path(backup.path(backup.model_url(MODEL, "m3"))) / "train.json").unlink()  # never committed
    (aliases / "uncommitted.json").write_text(json.dumps(pointer | {"alias": "uncommitted", "version": "m3"}))
    # ...and a good pointer with a newer history event (readers follow it forward) at a missing version.
    set_alias(backup, MODEL, "hist", "m1", "test set-up", expected=None)
    event = json.loads((aliases / "history" / "hist" / "0000000001.json").read_text())
    (aliases / "history" / "hist" / "0000000002.json").write_text(
        json.dumps(event | {"seq": 2, "version": "m9"})
    )

    dst = Store.from_url(str(tmp_path / "restored"))
    report = copy_root(backup, dst)

    restored = Path(dst.path(dst.root)) / "models" / MODEL / "aliases"
    assert (restored / "champion.json").exists() and report.aliases == 1
    refused = {"ghost": "m9", "escape": "'../../../x'", "uncommitted": "m3", "hist": "0000000002.json"}
    assert sorted(report.failed) == sorted(f"models/{MODEL}/aliases/{a}.json" for a in refused)
    for alias, why in refused.items():
        assert why in report.failed[f"models/{MODEL}/aliases/{alias}.json"], report.failed
        assert not (restored / f"{alias}.json").exists() and not (restored / "history" / alias).exists()


def test_restore_refuses_a_symlink_out_of_the_backup(tmp_path) -> None:
    """Local disk: a part that is a symlink to a file outside the backup root is not read."""
    secret = tmp_path / "secret.parquet"
    pd.DataFrame({"password": ["hunter2"]}).to_parquet(secret)
    backup = Store.from_url(str(tmp_path / "backup"))
    url = _dataset(backup, "leak", "v1")
    part = Path(backup.path(url)) / "part-00000.parquet"
    part.unlink()
    part.symlink_to(secret)
    manifest_path = Path(backup.path(url)) / "_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][0] |= {
        "size": secret.stat().st_size,
        "sha256": hashlib.sha256(secret.read_bytes()).hexdigest(),
    }
    manifest_path.write_text(json.dumps(manifest))

    dst = Store.from_url(str(tmp_path / "restored"))
    report = copy_root(backup, dst)
    assert "through a symlink" in report.failed["datasets/leak/v1"]
    assert "datasets/leak/v1/part-00000.parquet" in report.failed["datasets/leak/v1"]
    assert not list(Path(dst.path(dst.root)).rglob("*.parquet"))


@pytest.mark.parametrize("listed", ["/ABSOLUTE/secret.parquet", "../other/part-00000.parquet"])
def test_manifest_paths_stay_in_their_version_folder(tmp_path, listed) -> None:
    store = Store.from_url(str(tmp_path / "store"))
    other = _dataset(store, "other", "v1")
    secret = Path(store.path(other)) / "part-00000.parquet"
    url = _dataset(store, "tiny", "v1")
    manifest_path = Path(store.path(url)) / "_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    path = listed.replace("/ABSOLUTE/secret.parquet", str(secret))
    manifest["files"][0] |= {"path": path, "size": secret.stat().st_size}
    manifest_path.write_text(json.dumps(manifest))

    with pytest.raises(StorageError, match="refused") as err:
        read_dataset_pandas(store, url)
    assert path in str(err.value) and url in str(err.value)
    with pytest.raises(StorageError, match="refused"):
        open_manifest(store, url)
    assert not verify(store).ok


def test_a_symlinked_part_is_not_read_through_a_manifest(tmp_path) -> None:
    outside = tmp_path / "outside.parquet"
    pd.DataFrame({"x": [9]}).to_parquet(outside)
    store = Store.from_url(str(tmp_path / "store"))
    url = _dataset(store)
    part = Path(store.path(url)) / "part-00000.parquet"
    part.unlink()
    os.symlink(outside, part)
    manifest_path = Path(store.path(url)) / "_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][0]["size"] = outside.stat().st_size
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(StorageError, match="through a symlink"):
        read_dataset_pandas(store, url)
