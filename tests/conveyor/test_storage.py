"""Storage layer on fsspec's memory:// and local disk: manifests last, readers trust only committed
versions."""

from __future__ import annotations

import uuid

import pandas as pd
import pytest

from conveyor.store.storage import (
    MANIFEST,
    StorageError,
    Store,
    commit_dataset,
    committed,
    content_version,
    open_manifest,
    read_dataset_pandas,
    read_json,
    write_json_atomic,
)


@pytest.fixture
def mem_store() -> Store:
    store = Store.from_url(f"memory://conveyor-test-{uuid.uuid4().hex}")
    yield store
    store.fs.rm(store.path(store.root), recursive=True)


def _write_parts(store: Store, url: str, frames: list[pd.DataFrame]) -> None:
    fs = store.fs
    for i, frame in enumerate(frames):
        with fs.open(f"{store.path(url)}/part-{i}.parquet", "wb") as fh:
            frame.to_parquet(fh, index=False)


def test_commit_writes_manifest_with_rows_schema_and_checksums(mem_store: Store) -> None:
    url = mem_store.dataset_url("demo", "v1")
    _write_parts(mem_store, url, [pd.DataFrame({"a": [1, 2, 3]}), pd.DataFrame({"a": [4, 5]})])

    ref = commit_dataset(mem_store, "demo", "v1", url, lineage={"source": "unit"}, parallel=False)

    manifest = open_manifest(mem_store, url)
    assert ref.rows == manifest.rows == 5
    assert [f.rows for f in manifest.files] == [3, 2]
    assert all(len(f.sha256) == 64 and f.size > 0 for f in manifest.files)
    assert manifest.schema == {"a": "int64"}
    assert manifest.lineage == {"source": "unit"}
    assert read_dataset_pandas(mem_store, url)["a"].tolist() == [1, 2, 3, 4, 5]


def test_uncommitted_version_is_refused_and_not_found(mem_store: Store) -> None:
    url = mem_store.dataset_url("demo", "v2")
    _write_parts(mem_store, url, [pd.DataFrame({"a": [1]})])  # parts written, crash before the manifest

    assert committed(mem_store, "demo", "v2") is None
    with pytest.raises(StorageError, match="never committed"):
        read_dataset_pandas(mem_store, url)


def test_part_that_does_not_match_manifest_is_refused(mem_store: Store) -> None:
    url = mem_store.dataset_url("demo", "v3")
    _write_parts(mem_store, url, [pd.DataFrame({"a": [1, 2]})])
    commit_dataset(mem_store, "demo", "v3", url, lineage={}, parallel=False)
    _write_parts(mem_store, url, [pd.DataFrame({"a": list(range(100))})])  # overwritten behind our back

    with pytest.raises(StorageError, match="part-0.parquet is .* bytes"):
        open_manifest(mem_store, url)


def test_missing_part_is_refused(mem_store: Store) -> None:
    url = mem_store.dataset_url("demo", "v4")
    _write_parts(mem_store, url, [pd.DataFrame({"a": [1]}), pd.DataFrame({"a": [2]})])
    commit_dataset(mem_store, "demo", "v4", url, lineage={}, parallel=False)
    mem_store.fs.rm(f"{mem_store.path(url)}/part-1.parquet")

    with pytest.raises(StorageError, match="part-1.parquet listed in .* is missing"):
        open_manifest(mem_store, url)


def test_json_pointer_write_replaces_whole_file(tmp_path) -> None:
    store = Store.from_url(str(tmp_path))
    url = store.url("models", "m", "aliases", "champion.json")
    write_json_atomic(store, url, {"version": "a"})
    write_json_atomic(store, url, {"version": "b"})

    assert read_json(store, url) == {"version": "b"}
    assert sorted(p.name for p in (tmp_path / "models" / "m" / "aliases").iterdir()) == ["champion.json"]


def test_content_version_is_stable_and_input_sensitive() -> None:
    assert content_version("x", {"b": 1, "a": 2}) == content_version("x", {"a": 2, "b": 1})
    assert content_version("x", {"a": 1}) != content_version("x", {"a": 2})


def test_store_from_plain_path_is_a_file_url(tmp_path) -> None:
    store = Store.from_url(str(tmp_path / "root"))
    assert store.root.startswith("file:///")
    assert store.dataset_url("n", "v") == f"{store.root}/datasets/n/v"
    assert MANIFEST == "_manifest.json"


def test_store_repr_never_shows_credentials() -> None:
    store = Store.from_url("s3://bucket/prefix", {"key": "AKIAEXAMPLE", "secret": "s3cr3t"})
    assert "s3cr3t" not in repr(store) and "AKIAEXAMPLE" not in str(store)
