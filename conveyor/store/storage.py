"""Versioned datasets on any fsspec URL: parts first, the manifest last.

A dataset version lives at ``<root>/datasets/<name>/<version>/``. Its parquet
parts are written first and ``_manifest.json`` last, so a reader that only
trusts versions with a manifest never sees a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fsspec
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

MANIFEST = "_manifest.json"
PART_GLOB = "part-*.parquet"


class StorageError(RuntimeError):
    """A stored object is missing, incomplete or does not match its manifest."""


class UnsafeKeyError(StorageError):
    """A key read from a store, a backup or a manifest would leave the folder it belongs to."""


def check_key(key: Any, where: str = "") -> str:
    """``key`` if it is a plain relative key; else :class:`UnsafeKeyError` naming it.

    Keys come from listings, manifests and cards that whoever can write the store
    (or a backup) controls. Object stores keep ``..`` literally while local disks
    resolve it, so a key is refused rather than normalised: no ``.``, ``..`` or
    empty segment, no leading ``/``, no backslash, no control character.
    """
    bad = (
        not isinstance(key, str)
        or not key
        or key.startswith("/")
        or "\\" in key
        or any(part in ("", ".", "..") for part in key.split("/"))
        or any(ord(c) < 32 or ord(c) == 127 for c in key)
    )
    if bad:
        prefix = f"{where}: " if where else ""
        raise UnsafeKeyError(
            f"{prefix}key {key!r} is refused: a key must stay inside its folder "
            "(no '..', '.', empty or absolute parts)"
        )
    return key


def confined_join(base: str, key: Any, where: str = "") -> str:
    """``base/key`` for a :func:`check_key`-clean key (the only way stored keys are joined)."""
    return posixpath.join(base.rstrip("/"), check_key(key, where))


@dataclass(frozen=True)
class Store:
    """Where everything lives: one root URL plus the fsspec options to reach it.

    Credentials belong in ``options`` (from env or settings), never in the URL.
    """

    root: str
    options: dict[str, Any] = field(default_factory=dict, repr=False)  # may hold credentials: never printed

    @classmethod
    def from_url(cls, root: str, options: dict[str, Any] | None = None) -> Store:
        if "://" not in root:
            root = Path(root).expanduser().resolve().as_uri()
        return cls(root=root.rstrip("/"), options=dict(options or {}))

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return url_to_fs(self.root, **self.options)[0]

    def url(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def path(self, url: str) -> str:
        """The filesystem path (protocol stripped) of a URL under this store."""
        return url_to_fs(url, **self.options)[1]

    def dataset_url(self, name: str, version: str) -> str:
        return self.url("datasets", name, version)

    def quarantine_url(self, name: str, version: str) -> str:
        return self.url("quarantine", name, version)

    def model_url(self, model: str, version: str) -> str:
        return self.url("models", model, version)


def is_local(store: Store) -> bool:
    protocol = store.fs.protocol
    protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol)
    return "file" in protocols or "local" in protocols


def check_inside(store: Store, path: str, key: str, folder: str | None = None) -> str:
    """``path`` if, symlinks followed, it is still under ``folder`` (default: the store's root).

    Local disk only: on object stores :func:`check_key` already confines a key.
    """
    if not is_local(store):
        return path
    base = os.path.realpath(folder if folder is not None else store.path(store.root))
    real = os.path.realpath(path)
    if real != base and not real.startswith(base.rstrip(os.sep) + os.sep):
        raise UnsafeKeyError(f"key {key!r} resolves outside {base} (through a symlink)")
    return path


def content_version(*parts: Any) -> str:
    """A short, stable content hash of JSON-serialisable inputs."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# The modules every stage's output depends on, besides its own.
SHARED_MODULES = ("storage", "schema")


def code_version(*stages: str) -> str:
    """Hash of the code that made an output, so a change to it makes new versions.

    With stage names (``code_version("clean", "ingest")``) only those modules and
    the shared ones count: editing evaluation code does not invalidate the
    committed datasets and models. Without names, every module counts.
    """
    import importlib.util

    def source_of(name: str) -> Path:
        for package in ("conveyor.tasks", "conveyor.store"):
            spec = importlib.util.find_spec(f"{package}.{name}")
            if spec is not None and spec.origin:
                return Path(spec.origin)
        raise ValueError(f"code_version: no stage module named {name!r}")

    if stages:
        sources = [source_of(name) for name in sorted({*stages, *SHARED_MODULES})]
    else:
        tasks_folder = source_of("ingest").parent
        sources = sorted([*tasks_folder.glob("*.py"), Path(__file__)])
    digest = hashlib.sha256()
    for source in sources:
        digest.update(source.name.encode())
        digest.update(source.read_bytes())
    return digest.hexdigest()[:12]


def write_bytes_atomic(store: Store, url: str, data: bytes) -> None:
    """Publish ``data`` at ``url`` so readers see the old object or the new one, never a torn one.

    Local disk: write a sibling temp file, then ``os.replace``. Object stores: a
    single PUT is already atomic.
    """
    fs = store.fs
    path = store.path(url)
    if "file" in fs.protocol or "local" in fs.protocol:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def write_json_atomic(store: Store, url: str, obj: Any) -> None:
    write_bytes_atomic(store, url, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_json(store: Store, url: str) -> Any:
    with store.fs.open(store.path(url), "rb") as fh:
        return json.load(fh)


def exists(store: Store, url: str) -> bool:
    return store.fs.exists(store.path(url))


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the version folder
    size: int
    sha256: str
    rows: int


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    rows: int
    schema: dict[str, str]
    files: list[FileEntry]
    lineage: dict[str, Any]
    code_version: str
    created_at: str
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        """A manifest as stored; every ``files[].path`` must be a key inside the version folder."""
        data = dict(data)
        data["files"] = [FileEntry(**f) for f in data["files"]]
        for entry in data["files"]:
            check_key(entry.path, f"{MANIFEST} files[].path")
        return cls(**data)


@dataclass(frozen=True)
class DatasetRef:
    """A committed dataset version: where it is and how many rows it holds."""

    name: str
    version: str
    url: str
    rows: int


def _describe_file(fs: fsspec.AbstractFileSystem, path: str) -> tuple[int, str, int, dict[str, str]]:
    digest = hashlib.sha256()
    size = 0
    with fs.open(path, "rb") as fh:
        while chunk := fh.read(4 << 20):
            digest.update(chunk)
            size += len(chunk)
    with fs.open(path, "rb") as fh:
        meta = pq.ParquetFile(fh).metadata
        schema = {f.name: str(f.type) for f in meta.schema.to_arrow_schema()}
        rows = meta.num_rows
    return size, digest.hexdigest(), rows, schema


def parquet_write_options(store: Store) -> dict[str, Any]:
    """``dask.dataframe.to_parquet`` options for the parts of a version: ``part-00000.parquet`` names, no
    index or ``_metadata`` file, not computed yet (the caller computes its writes together, then commits)."""
    return {
        "write_index": False,
        "storage_options": store.options,
        "compute": False,
        "write_metadata_file": False,
        "name_function": lambda i: f"part-{i:05d}.parquet",
    }


def clear_version(store: Store, url: str) -> None:
    """Remove leftovers of an earlier, uncommitted attempt at this version."""
    fs = store.fs
    path = store.path(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def list_parts(store: Store, url: str) -> list[str]:
    fs = store.fs
    return sorted(fs.glob(posixpath.join(store.path(url), PART_GLOB)))


def commit_dataset(
    store: Store,
    name: str,
    version: str,
    url: str,
    lineage: dict[str, Any],
    parallel: bool = True,
    extra: dict[str, Any] | None = None,
) -> DatasetRef:
    """Checksum the parts under ``url`` and publish the manifest, last and atomically."""
    fs = store.fs
    parts = list_parts(store, url)
    if parallel and len(parts) > 1:
        import dask

        described = list(dask.compute(*[dask.delayed(_describe_file, pure=False)(fs, p) for p in parts]))
    else:
        described = [_describe_file(fs, p) for p in parts]
    base = store.path(url)
    files = [
        FileEntry(path=posixpath.relpath(p, base), size=size, sha256=sha, rows=rows)
        for p, (size, sha, rows, _) in zip(parts, described, strict=False)
    ]
    schema = described[0][3] if described else {}
    manifest = Manifest(
        name=name,
        version=version,
        rows=sum(f.rows for f in files),
        schema=schema,
        files=files,
        lineage=lineage,
        code_version=code_version(),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        extra=extra or {},
    )
    write_json_atomic(store, posixpath.join(url, MANIFEST), asdict(manifest))
    return DatasetRef(name=name, version=version, url=url, rows=manifest.rows)


def open_manifest(store: Store, url: str) -> Manifest:
    """The manifest of a committed version; a clear error if it is not committed or is damaged."""
    fs = store.fs
    base = store.path(url)
    manifest_path = posixpath.join(base, MANIFEST)
    if not fs.exists(manifest_path):
        raise StorageError(
            f"{url}: no {MANIFEST}; this version was never committed (or its write was interrupted)"
        )
    try:
        manifest = Manifest.from_json(read_json(store, posixpath.join(url, MANIFEST)))
    except UnsafeKeyError as exc:
        raise UnsafeKeyError(f"{url}: {exc}") from None
    for entry in manifest.files:
        path = check_inside(store, confined_join(base, entry.path, url), entry.path, folder=base)
        try:
            size = fs.size(path)
        except FileNotFoundError:
            raise StorageError(f"{url}: part {entry.path} listed in {MANIFEST} is missing") from None
        if size != entry.size:
            raise StorageError(f"{url}: part {entry.path} is {size} bytes, {MANIFEST} says {entry.size}")
    return manifest


def committed(store: Store, name: str, version: str, url: str | None = None) -> DatasetRef | None:
    """The committed version if it already exists (so finished work is not redone)."""
    url = url or store.dataset_url(name, version)
    if not exists(store, posixpath.join(url, MANIFEST)):
        return None
    manifest = open_manifest(store, url)
    return DatasetRef(name=name, version=version, url=url, rows=manifest.rows)


def part_urls(store: Store, url: str, manifest: Manifest) -> list[str]:
    return [confined_join(url, f.path, url) for f in manifest.files]


def read_dataset(store: Store, url: str, columns: list[str] | None = None):
    """A lazy dask frame over a committed version's parts (never over uncommitted files).

    Dask's planner may fuse small parts into one partition when the frame is optimised: count and
    index partitions of ``frame.optimize()``, never of the frame as read (see ``train.spread``).
    """
    import dask.dataframe as dd

    manifest = open_manifest(store, url)
    if not manifest.files:
        raise StorageError(f"{url}: committed with zero parts")
    return dd.read_parquet(part_urls(store, url, manifest), columns=columns, storage_options=store.options)


def read_dataset_pandas(store: Store, url: str, columns: list[str] | None = None):
    """Read a small committed dataset (a dimension table) into pandas."""
    import pandas as pd

    manifest = open_manifest(store, url)
    frames = []
    for part in part_urls(store, url, manifest):
        with store.fs.open(store.path(part), "rb") as fh:
            frames.append(pd.read_parquet(fh, columns=columns))
    return pd.concat(frames, ignore_index=True)
