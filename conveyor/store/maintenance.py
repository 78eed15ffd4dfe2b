"""Keeping a storage root honest: verify every version, collect orphans, copy roots for backup and replicas.

A *version* is a folder ``datasets/<name>/<v>/``, ``quarantine/<name>/<v>/`` or
``models/<model>/<v>/``. It is committed when its marker exists: the
``_manifest.json`` of a dataset, the ``train.json`` of a model. Everything a
copy writes goes in the same order as the original writer: files first, the
marker last, so an interrupted backup or replica never looks complete and a
rerun picks up where it stopped.
"""

from __future__ import annotations

import hashlib
import posixpath
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime

from conveyor.store.storage import MANIFEST, Manifest, Store, read_json, write_bytes_atomic

MODEL_MARKER = "train.json"
MODEL_FILE = "model.ubj"
KINDS = ("datasets", "quarantine", "models")
TMP_TAG = ".tmp-"
CHUNK = 8 << 20


@dataclass(frozen=True)
class Version:
    kind: str  # "datasets", "quarantine" or "models"
    name: str
    version: str

    @property
    def rel(self) -> str:
        return f"{self.kind}/{self.name}/{self.version}"

    @property
    def marker(self) -> str:
        return MODEL_MARKER if self.kind == "models" else MANIFEST


@dataclass
class VerifyReport:
    checked: int = 0
    problems: dict[str, list[str]] = field(default_factory=dict)  # version rel path -> problems

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class Orphan:
    path: str  # relative to the root
    reason: str
    bytes: int


@dataclass
class GcReport:
    orphans: list[Orphan]
    removed: bool
    skipped_young: int  # uncommitted files younger than min_age: maybe a run still writing

    @property
    def bytes(self) -> int:
        return sum(o.bytes for o in self.orphans)


@dataclass
class CopyReport:
    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already present and verified at the destination
    failed: dict[str, str] = field(default_factory=dict)
    aliases: int = 0
    bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed


def _join(store: Store, *parts: str) -> str:
    return posixpath.join(store.path(store.root), *parts)


def _ls_dirs(store: Store, path: str) -> list[str]:
    fs = store.fs
    if not fs.exists(path):
        return []
    return sorted(
        posixpath.basename(e["name"].rstrip("/"))
        for e in fs.ls(path, detail=True)
        if e["type"] == "directory"
    )


def versions(
    store: Store, kinds: tuple[str, ...] = KINDS, names: set[str] | None = None
) -> Iterator[Version]:
    """Every version folder under the root, committed or not."""
    for kind in kinds:
        for name in _ls_dirs(store, _join(store, kind)):
            if names is not None and name not in names:
                continue
            for version in _ls_dirs(store, _join(store, kind, name)):
                if kind == "models" and version == "aliases":
                    continue
                yield Version(kind, name, version)


def _files(store: Store, v: Version) -> dict[str, int]:
    """Files of a version (relative path -> size)."""
    base = _join(store, v.rel)
    found = store.fs.find(base, detail=True)
    return {posixpath.relpath(p, base): int(info.get("size") or 0) for p, info in found.items()}


def sha256_of(store: Store, path: str) -> str:
    digest = hashlib.sha256()
    with store.fs.open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _expected(store: Store, v: Version) -> dict[str, tuple[int, str | None]]:
    """What the marker promises: relative path -> (size, sha256 or None when only presence is recorded)."""
    if v.kind == "models":
        info = read_json(store, store.url(v.rel, MODEL_MARKER))
        return {
            info.get("model_file", MODEL_FILE): (int(info.get("model_bytes", -1)), info.get("model_sha256"))
        }
    manifest = Manifest.from_json(read_json(store, store.url(v.rel, MANIFEST)))
    return {f.path: (f.size, f.sha256) for f in manifest.files}


def verify_version(store: Store, v: Version, checksums: bool = True) -> list[str]:
    """Problems with one version; empty when its files match its marker."""
    present = _files(store, v)
    if v.marker not in present:
        return [f"no {v.marker}: never committed or interrupted"]
    try:
        expected = _expected(store, v)
    except Exception as exc:
        return [f"{v.marker} is unreadable ({type(exc).__name__}: {exc})"]
    problems = []
    for rel, (size, sha) in expected.items():
        if rel not in present:
            problems.append(f"{rel} is missing")
        elif size >= 0 and present[rel] != size:
            problems.append(f"{rel} is {present[rel]} bytes, {v.marker} says {size}")
        elif checksums and sha and sha256_of(store, _join(store, v.rel, rel)) != sha:
            problems.append(f"{rel} checksum does not match {v.marker}")
    return problems


def verify(store: Store, checksums: bool = True, names: set[str] | None = None) -> VerifyReport:
    """Check every committed version under the root (uncommitted leftovers are gc's business)."""
    report = VerifyReport()
    for v in versions(store, names=names):
        if not store.fs.exists(_join(store, v.rel, v.marker)):
            continue
        report.checked += 1
        problems = verify_version(store, v, checksums)
        if problems:
            report.problems[v.rel] = problems
    return report


def _age_s(info: dict) -> float | None:
    stamp = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("created")
    if stamp is None:
        return None
    if isinstance(stamp, datetime):
        return time.time() - stamp.timestamp()
    return time.time() - float(stamp)


def find_orphans(store: Store, min_age_s: float = 3600.0) -> tuple[list[Orphan], int]:
    """Files no reader will ever trust: uncommitted versions, unlisted parts, temp files.

    Files younger than ``min_age_s`` are left out (a run may still be writing them);
    their count is returned so the user knows they exist.
    """
    fs = store.fs
    orphans: list[Orphan] = []
    young = 0
    for v in versions(store):
        base = _join(store, v.rel)
        found = fs.find(base, detail=True)
        committed = any(posixpath.relpath(p, base) == v.marker for p in found)
        listed: set[str] = set()
        if committed:
            try:
                listed = set(_expected(store, v)) | {v.marker}
            except Exception:
                continue  # a damaged marker is verify's business, never gc's
            if v.kind == "models":
                listed = None  # model folders gain reports and plots after training; all are kept
        for path, info in found.items():
            rel = posixpath.relpath(path, base)
            if committed and (listed is None or rel in listed) and TMP_TAG not in rel:
                continue
            age = _age_s(info)
            if age is not None and age < min_age_s:
                young += 1
                continue
            reason = (
                "temporary file of an interrupted write"
                if TMP_TAG in rel
                else f"not listed in {v.marker}"
                if committed
                else f"version has no {v.marker}"
            )
            orphans.append(Orphan(posixpath.relpath(path, _join(store)), reason, int(info.get("size") or 0)))
    return orphans, young


def gc(store: Store, apply: bool = False, min_age_s: float = 3600.0) -> GcReport:
    """List (dry run, the default) or remove orphaned files and then-empty version folders."""
    orphans, young = find_orphans(store, min_age_s)
    if apply:
        fs = store.fs
        for orphan in orphans:
            fs.rm(_join(store, orphan.path))
        for v in versions(store):
            base = _join(store, v.rel)
            if fs.exists(base) and not fs.find(base):
                fs.rm(base, recursive=True)
    return GcReport(orphans=orphans, removed=apply, skipped_young=young)


def _copy_file(src: Store, src_path: str, dst: Store, dst_path: str) -> tuple[int, str]:
    """Stream one file across filesystems; returns (bytes, sha256 of what was read)."""
    digest = hashlib.sha256()
    size = 0
    dst.fs.makedirs(posixpath.dirname(dst_path), exist_ok=True)
    with src.fs.open(src_path, "rb") as fin, dst.fs.open(dst_path, "wb") as fout:
        while chunk := fin.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
            fout.write(chunk)
    return size, digest.hexdigest()


def copy_version(src: Store, dst: Store, v: Version) -> tuple[str, int]:
    """Copy one committed version, verify it at the destination, publish its marker last.

    Returns ("copied" | "skipped", bytes). Raises ValueError when the source itself
    does not match its marker (a corrupted copy is never spread further).
    """
    if dst.fs.exists(_join(dst, v.rel, v.marker)) and not verify_version(dst, v):
        return "skipped", 0
    problems = verify_version(src, v)
    if problems:
        raise ValueError(f"{src.url(v.rel)}: source does not match its {v.marker}: {'; '.join(problems)}")
    expected = _expected(src, v)
    dst_base = _join(dst, v.rel)
    if dst.fs.exists(dst_base):
        dst.fs.rm(dst_base, recursive=True)  # a half-copied or damaged earlier attempt
    total = 0
    for rel in sorted(_files(src, v)):
        if rel == v.marker or TMP_TAG in rel:
            continue
        size, sha = _copy_file(src, _join(src, v.rel, rel), dst, _join(dst, v.rel, rel))
        total += size
        want = expected.get(rel, (None, None))[1]
        if want and sha != want:
            raise ValueError(f"{src.url(v.rel, rel)} changed while it was copied (checksum mismatch)")
    for rel, (_size, sha) in expected.items():  # read back what the destination stored
        if sha and sha256_of(dst, _join(dst, v.rel, rel)) != sha:
            raise ValueError(f"{dst.url(v.rel, rel)}: the copy does not match the checksum in {v.marker}")
    with src.fs.open(_join(src, v.rel, v.marker), "rb") as fh:
        marker = fh.read()
    write_bytes_atomic(dst, dst.url(v.rel, v.marker), marker)
    return "copied", total + len(marker)


def _copy_aliases(src: Store, dst: Store, names: set[str] | None) -> int:
    """Alias history first, then the pointers (each pointer is one atomic write)."""
    count = 0
    for model in _ls_dirs(src, _join(src, "models")):
        if names is not None and model not in names:
            continue
        base = _join(src, "models", model, "aliases")
        if not src.fs.exists(base):
            continue
        files = sorted(src.fs.find(base))
        history = [p for p in files if "/history/" in p]
        pointers = [p for p in files if "/history/" not in p and p.endswith(".json") and TMP_TAG not in p]
        for path in history + pointers:
            rel = posixpath.relpath(path, _join(src))
            with src.fs.open(path, "rb") as fh:
                write_bytes_atomic(dst, dst.url(rel), fh.read())
            count += path in pointers
    return count


def copy_root(src: Store, dst: Store, names: set[str] | None = None) -> CopyReport:
    """Copy every committed version (or those of the named datasets/models) and the model aliases.

    Idempotent and resumable: versions already verified at the destination are skipped.
    """
    report = CopyReport()
    for v in versions(src, names=names):
        if not src.fs.exists(_join(src, v.rel, v.marker)):
            continue  # uncommitted: nothing to back up
        try:
            outcome, size = copy_version(src, dst, v)
        except Exception as exc:
            report.failed[v.rel] = f"{type(exc).__name__}: {exc}"
            continue
        (report.copied if outcome == "copied" else report.skipped).append(v.rel)
        report.bytes += size
    if report.ok:  # pointers only once every version they may name is there
        report.aliases = _copy_aliases(src, dst, names)
    return report


def replicate(store: Store, replicas: list[Store], rels: list[str]) -> dict[str, CopyReport]:
    """Copy the given committed versions (``kind/name/version``) to every replica, verified."""
    reports = {}
    for replica in replicas:
        report = CopyReport()
        for rel in rels:
            kind, name, version = rel.split("/")
            v = Version(kind, name, version)
            try:
                outcome, size = copy_version(store, replica, v)
            except Exception as exc:
                report.failed[rel] = f"{type(exc).__name__}: {exc}"
                continue
            (report.copied if outcome == "copied" else report.skipped).append(rel)
            report.bytes += size
        if report.ok:
            report.aliases = _copy_aliases(
                store, replica, {rel.split("/")[1] for rel in rels if rel.startswith("models/")}
            )
        reports[replica.root] = report
    return reports
