"""Keeping a storage root honest: verify every version, collect orphans, copy roots for backup and replicas.

A *version* is a folder ``datasets/<name>/<v>/``, ``quarantine/<name>/<v>/`` or
``models/<model>/<v>/``. It is committed when its marker exists: the
``_manifest.json`` of a dataset, the ``train.json`` of a model. Everything a
copy writes goes in the same order as the original writer: files first, the
marker last, so an interrupted backup or replica never looks complete and a
rerun picks up where it stopped.

A backup is written by someone else: every key read from a listing, a marker or
an alias is confined to its root (:func:`conveyor.store.storage.check_key`) on
both sides before it is used, and an alias is restored only when it points at a
version verified at the destination.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from conveyor.store.registry import ALIAS_NAME, ALIASES
from conveyor.store.storage import (
    MANIFEST,
    Manifest,
    Store,
    UnsafeKeyError,
    check_inside,
    check_key,
    read_json,
    write_bytes_atomic,
)

logger = logging.getLogger("conveyor.store.maintenance")

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
        return "/".join(part for part in (self.kind, self.name, self.version) if part)

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


def _join(store: Store, *keys: str) -> str:
    """The path of ``keys`` under the root; every key is checked, so nothing joined here leaves the root."""
    return posixpath.join(store.path(store.root), *(check_key(k) for k in keys))


def _below(base: str, path: str) -> str:
    """``path`` relative to ``base`` as listed (no normalisation: object stores keep ``..`` literally)."""
    prefix = base.rstrip("/") + "/"
    if not path.startswith(prefix):
        raise UnsafeKeyError(f"listed key {path!r} is not under {base!r}")
    return path[len(prefix) :]


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
            try:
                check_key(name)
            except UnsafeKeyError:
                yield Version(kind, name, "")  # not listed further; every use of it is refused, naming it
                continue
            for version in _ls_dirs(store, _join(store, kind, name)):
                if kind == "models" and version == "aliases":
                    continue
                yield Version(kind, name, version)


def _files(store: Store, v: Version) -> dict[str, int]:
    """Files of a version (relative key, unchecked -> size)."""
    base = _join(store, v.rel)
    found = store.fs.find(base, detail=True)
    return {_below(base, p): int(info.get("size") or 0) for p, info in found.items()}


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


def _expected_checked(store: Store, v: Version) -> dict[str, tuple[int, str | None]]:
    expected = _expected(store, v)
    for rel in expected:
        check_key(rel, f"{v.rel}/{v.marker}")
    return expected


def verify_version(store: Store, v: Version, checksums: bool = True) -> list[str]:
    """Problems with one version; empty when its files match its marker and every key stays inside it."""
    try:
        present = _files(store, v)
    except UnsafeKeyError as exc:
        return [str(exc)]
    unsafe = []
    for rel in present:
        try:
            check_key(rel, v.rel)
        except UnsafeKeyError as exc:
            unsafe.append(str(exc))
    if unsafe:
        return unsafe
    if v.marker not in present:
        return [f"no {v.marker}: never committed or interrupted"]
    try:
        expected = _expected_checked(store, v)
    except UnsafeKeyError as exc:
        return [str(exc)]
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
        try:
            marker = _join(store, v.rel, v.marker)
        except UnsafeKeyError as exc:
            report.problems[v.rel] = [str(exc)]
            continue
        if not store.fs.exists(marker):
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
    root = _join(store)
    for v in versions(store):
        try:
            base = _join(store, v.rel)
        except UnsafeKeyError as exc:
            logger.warning("gc leaves %s alone: %s", v.rel, exc)  # verify reports it
            continue
        found = fs.find(base, detail=True)
        committed = any(_below(base, p) == v.marker for p in found)
        listed: set[str] = set()
        if committed:
            try:
                listed = set(_expected(store, v)) | {v.marker}
            except Exception:
                continue  # a damaged marker is verify's business, never gc's
            if v.kind == "models":
                listed = None  # model folders gain reports and plots after training; all are kept
        for path, info in found.items():
            rel = _below(base, path)
            try:
                key = check_key(_below(root, path))
            except UnsafeKeyError as exc:
                logger.warning("gc leaves %s alone: %s", path, exc)
                continue
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
            orphans.append(Orphan(key, reason, int(info.get("size") or 0)))
    return orphans, young


def gc(store: Store, apply: bool = False, min_age_s: float = 3600.0) -> GcReport:
    """List (dry run, the default) or remove orphaned files and then-empty version folders."""
    orphans, young = find_orphans(store, min_age_s)
    if apply:
        fs = store.fs
        for orphan in orphans:
            fs.rm(_join(store, orphan.path))
        for v in versions(store):
            try:
                base = _join(store, v.rel)
            except UnsafeKeyError:
                continue
            if fs.exists(base) and not fs.find(base):
                fs.rm(base, recursive=True)
    return GcReport(orphans=orphans, removed=apply, skipped_young=young)


def _copy_file(src: Store, src_path: str, dst: Store, dst_path: str, key: str) -> tuple[int, str]:
    """Stream one file across filesystems; returns (bytes, sha256 of what was read).

    On local disk a symlink could still lead out of either root: both ends are
    resolved and confined first.
    """
    digest = hashlib.sha256()
    size = 0
    check_inside(src, src_path, key)
    dst.fs.makedirs(posixpath.dirname(dst_path), exist_ok=True)
    check_inside(dst, dst_path, key)
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
    check_inside(src, _join(src, v.rel), v.rel)
    problems = verify_version(src, v)
    if problems:
        raise ValueError(f"{src.url(v.rel)}: source does not match its {v.marker}: {'; '.join(problems)}")
    expected = _expected_checked(src, v)
    dst_base = check_inside(dst, _join(dst, v.rel), v.rel)
    if dst.fs.exists(dst_base):
        dst.fs.rm(dst_base, recursive=True)  # a half-copied or damaged earlier attempt
    total = 0
    for rel in sorted(_files(src, v)):
        if rel == v.marker or TMP_TAG in rel:
            continue
        size, sha = _copy_file(src, _join(src, v.rel, rel), dst, _join(dst, v.rel, rel), f"{v.rel}/{rel}")
        total += size
        want = expected.get(rel, (None, None))[1]
        if want and sha != want:
            raise ValueError(f"{src.url(v.rel, rel)} changed while it was copied (checksum mismatch)")
    for rel, (_size, sha) in expected.items():  # read back what the destination stored
        if sha and sha256_of(dst, _join(dst, v.rel, rel)) != sha:
            raise ValueError(f"{dst.url(v.rel, rel)}: the copy does not match the checksum in {v.marker}")
    with src.fs.open(check_inside(src, _join(src, v.rel, v.marker), v.marker), "rb") as fh:
        marker = fh.read()
    write_bytes_atomic(dst, dst.url(v.rel, v.marker), marker)
    return "copied", total + len(marker)


def _pointed_version(blob: bytes, model: str, alias: str) -> str:
    """The version an alias file (pointer or history event) names, checked to be a plain version key."""
    event = json.loads(blob)
    if not isinstance(event, dict):
        raise ValueError("not an alias event (a JSON object)")
    if event.get("model", model) != model or event.get("alias", alias) != alias:
        raise ValueError(f"names {event.get('model')}/{event.get('alias')}, not {model}/{alias}")
    version = event.get("version")
    if not isinstance(version, str) or "/" in version:
        raise UnsafeKeyError(f"version {version!r} is not a version name")
    return check_key(version)


def _copy_aliases(src: Store, dst: Store, names: set[str] | None, report: CopyReport) -> int:
    """Alias history first, then the pointers (each pointer is one atomic write).

    An alias is restored only when every file of it (pointer and history events)
    names a version committed and verified at the destination; anything else is
    refused in ``report.failed`` under its key, and the destination's alias is
    left as it was.
    """
    count = 0
    verified: dict[str, bool] = {}

    def ok_at_destination(model: str, version: str) -> bool:
        v = Version("models", model, version)
        if v.rel not in verified:
            verified[v.rel] = dst.fs.exists(_join(dst, v.rel, v.marker)) and not verify_version(dst, v)
        return verified[v.rel]

    for model in _ls_dirs(src, _join(src, "models")):
        if names is not None and model not in names:
            continue
        try:
            base = _join(src, "models", model, ALIASES)
        except UnsafeKeyError as exc:
            report.failed[f"models/{model}"] = str(exc)
            continue
        if not src.fs.exists(base):
            continue
        pointers = [p for p in src.fs.ls(base, detail=False) if p.endswith(".json") and src.fs.isfile(p)]
        for pointer in sorted(p for p in pointers if TMP_TAG not in p):
            alias = _below(base, pointer).removesuffix(".json")
            key = f"models/{model}/{ALIASES}/{alias}.json"
            try:
                _copy_alias(src, dst, model, alias, ok_at_destination)
            except Exception as exc:
                report.failed[key] = f"refused: {type(exc).__name__}: {exc}"
                continue
            count += 1
    return count


def _copy_alias(src: Store, dst: Store, model: str, alias: str, ok_at_destination: Any) -> None:
    if not ALIAS_NAME.match(alias):
        raise UnsafeKeyError(f"alias name {alias!r} must match {ALIAS_NAME.pattern}")
    pointer_key = f"models/{model}/{ALIASES}/{alias}.json"
    history_key = f"models/{model}/{ALIASES}/history/{alias}"
    history = _join(src, history_key)
    events = sorted(src.fs.find(history)) if src.fs.exists(history) else []
    keys = [f"{history_key}/{check_key(_below(history, e))}" for e in events]
    keys = [k for k in keys if TMP_TAG not in k] + [pointer_key]  # the pointer last
    blobs = []
    for key in keys:
        with src.fs.open(check_inside(src, _join(src, key), key), "rb") as fh:
            blob = fh.read()
        version = _pointed_version(blob, model, alias)
        if not ok_at_destination(model, version):
            raise ValueError(f"{key} names version {version}, which is not verified at the destination")
        blobs.append((key, blob))
    for key, blob in blobs:
        write_bytes_atomic(dst, dst.url(key), blob)


def copy_root(src: Store, dst: Store, names: set[str] | None = None) -> CopyReport:
    """Copy every committed version (or those of the named datasets/models) and the model aliases.

    Idempotent and resumable: versions already verified at the destination are skipped.
    """
    report = CopyReport()
    for v in versions(src, names=names):
        try:
            if not src.fs.exists(_join(src, v.rel, v.marker)):
                continue  # uncommitted: nothing to back up
            outcome, size = copy_version(src, dst, v)
        except Exception as exc:
            report.failed[v.rel] = f"{type(exc).__name__}: {exc}"
            continue
        (report.copied if outcome == "copied" else report.skipped).append(v.rel)
        report.bytes += size
    if report.ok:  # pointers only once every version they may name is there
        report.aliases = _copy_aliases(src, dst, names, report)
    return report


def replicate(store: Store, replicas: list[Store], rels: list[str]) -> dict[str, CopyReport]:
    """Copy the given committed versions (``kind/name/version``) to every replica, verified."""
    reports = {}
    for replica in replicas:
        report = CopyReport()
        for rel in rels:
            try:
                kind, name, version = rel.split("/")
                outcome, size = copy_version(store, replica, Version(kind, name, version))
            except Exception as exc:
                report.failed[rel] = f"{type(exc).__name__}: {exc}"
                continue
            (report.copied if outcome == "copied" else report.skipped).append(rel)
            report.bytes += size
        if report.ok:
            report.aliases = _copy_aliases(
                store, replica, {rel.split("/")[1] for rel in rels if rel.startswith("models/")}, report
            )
        reports[replica.root] = report
    return reports
