"""The fault tally, computed from observations, and the store scan behind its "partial objects" count.

Helpers for tests/faults (not a test module): the ``faults`` fixture in
conftest.py hands each test a :class:`FaultLog`; test_faults.py builds a
private one to prove a broken recovery shows in the line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# --- scanning a store: uncommitted objects, and committed versions a reader would serve partial ----


@dataclass
class Scan:
    versions: int = 0  # version folders holding at least one object
    uncommitted: int = 0  # objects with no manifest (no train.json for a model): readers refuse them
    refused: int = 0  # committed, files differ from the manifest, and the reader refuses it
    visible: int = 0  # committed, files differ from the manifest, and the reader serves it anyway
    errors: int = 0  # the scan itself failed


def _sha256(fs, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _version_dirs(fs, root: str) -> list[str]:
    """``root/<name>/<version>`` folders (none when root is absent)."""
    if not fs.exists(root):
        return []
    found = []
    for name in fs.ls(root, detail=True):
        if name["type"] != "directory" or posixpath.basename(name["name"]) == "aliases":
            continue
        found += [v["name"] for v in fs.ls(name["name"], detail=True) if v["type"] == "directory"]
    return found


def _dataset_intact(fs, folder: str) -> bool:
    entries = json.loads(fs.cat_file(posixpath.join(folder, "_manifest.json")))["files"]
    for entry in entries:
        path = posixpath.join(folder, entry["path"])
        if not fs.exists(path) or fs.size(path) != entry["size"] or _sha256(fs, path) != entry["sha256"]:
            return False
    return True


def _model_intact(fs, folder: str) -> bool:
    info = json.loads(fs.cat_file(posixpath.join(folder, "train.json")))
    path = posixpath.join(folder, info.get("model_file", "model.ubj"))
    if not fs.exists(path):
        return False
    return fs.size(path) == info.get("model_bytes", -1) and _sha256(fs, path) == info.get("model_sha256")


def _served(read) -> bool:
    """Whether the product's reader hands the damaged version out (True) or refuses it."""
    try:
        read()
    except Exception:
        return False
    return True


def scan_store(store) -> Scan:
    """Every dataset, quarantine and model version folder under ``store``, checked as described above."""
    from conveyor.store.storage import read_dataset
    from conveyor.tasks.train import load_booster

    fs, scan = store.fs, Scan()
    for kind in ("datasets", "quarantine", "models"):
        for folder in _version_dirs(fs, store.path(store.url(kind))):
            objects = fs.find(folder)
            if not objects:
                continue
            scan.versions += 1
            marker = posixpath.join(folder, "train.json" if kind == "models" else "_manifest.json")
            if not fs.exists(marker):
                scan.uncommitted += len(objects)
                continue
            rel = posixpath.relpath(folder, store.path(store.root))
            url = store.url(*rel.split("/"))
            if kind == "models":
                intact, read = _model_intact(fs, folder), lambda url=url: load_booster(store, url)
            else:
                intact = _dataset_intact(fs, folder)
                read = lambda url=url: read_dataset(store, url).compute(scheduler="sync")  # noqa: E731
            if not intact:
                if _served(read):
                    scan.visible += 1
                else:
                    scan.refused += 1
    return scan


def rows_in_storage(store, name: str, kinds: tuple[str, ...] = ("datasets", "quarantine")) -> int:
    """Rows of every committed version of ``name``, read back from the parquet parts the manifests list."""
    import pyarrow.parquet as pq

    fs, rows = store.fs, 0
    for kind in kinds:
        root = store.path(store.url(kind, name))
        if not fs.exists(root):
            continue
        for version in fs.ls(root, detail=False):
            manifest = posixpath.join(version, "_manifest.json")
            if not fs.exists(manifest):
                continue
            for entry in json.loads(fs.cat_file(manifest))["files"]:
                with fs.open(posixpath.join(version, entry["path"]), "rb") as fh:
                    rows += pq.read_table(fh).num_rows
    return rows


# --- the tally -----------------------------------------------------------------------------------


@dataclass
class Fault:
    name: str
    evidence: str = ""  # what showed the fault really happened; empty: not confirmed
    recovered: bool = False

    def hit(self, evidence: str | bool, what: str = "") -> None:
        """Record what showed the fault happened (falsy: it was not seen)."""
        if evidence:
            self.evidence = what or str(evidence)

    def recover(self, observed: bool) -> None:
        self.recovered = bool(observed)


@dataclass
class Tally:
    faults: list[Fault] = field(default_factory=list)
    rows_written: int = 0
    rows_read_back: int = 0
    scan: Scan = field(default_factory=Scan)
    alerts_tried: int = 0  # destinations a send was attempted to, the dead ones included
    alerts_delivered: int = 0  # deliveries seen by the receiver
    alerts_failed: int = 0  # destinations that could not take the alert
    alerts_failed_logged: int = 0  # of those, how many were logged as ALERT NOT DELIVERED

    def add(self, other: Tally) -> None:
        self.faults += other.faults
        self.rows_written += other.rows_written
        self.rows_read_back += other.rows_read_back
        for name in ("versions", "uncommitted", "refused", "visible", "errors"):
            setattr(self.scan, name, getattr(self.scan, name) + getattr(other.scan, name))
        for name in ("alerts_tried", "alerts_delivered", "alerts_failed", "alerts_failed_logged"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def rows_lost(self) -> int:
        return max(self.rows_written - self.rows_read_back, 0)

    def line(self) -> str:
        hit = sum(1 for f in self.faults if f.evidence)
        recovered = sum(1 for f in self.faults if f.recovered)
        s = self.scan
        scanned = (
            f"{s.versions} versions scanned: {s.refused} damaged and refused, "
            f"{s.uncommitted} uncommitted objects left for gc"
        )
        if s.errors:
            scanned += f", {s.errors} scans FAILED"
        return (
            f"faults injected {len(self.faults)} (confirmed hit {hit}), "
            f"recovered {recovered}/{len(self.faults)}, "
            f"rows lost {self.rows_lost:,} of {self.rows_written:,} written, "
            f"partial objects visible {s.visible} ({scanned}), "
            f"alerts delivered {self.alerts_delivered}/{self.alerts_tried} "
            f"(undelivered and logged {self.alerts_failed_logged}/{self.alerts_failed})"
        )


class FaultLog:
    """What one test injected and observed. Stores registered with :meth:`watch` are scanned after it."""

    def __init__(self) -> None:
        self.entry = Tally()
        self.stores: list = []

    def inject(self, name: str) -> Fault:
        fault = Fault(name)
        self.entry.faults.append(fault)
        return fault

    def rows(self, written: int, read_back: int) -> None:
        self.entry.rows_written += written
        self.entry.rows_read_back += read_back

    def alerts(self, tried: int, delivered: int, failed: int, failed_logged: int) -> None:
        self.entry.alerts_tried += tried
        self.entry.alerts_delivered += delivered
        self.entry.alerts_failed += failed
        self.entry.alerts_failed_logged += failed_logged

    def watch(self, store) -> None:
        self.stores.append(store)

    def finish(self) -> Tally:
        """Scan the watched stores into the entry (a scan that fails is counted, never hidden)."""
        for store in self.stores:
            try:
                scan = scan_store(store)
            except Exception:
                log.exception("scan of %s failed", store.root)
                scan = Scan(errors=1)
            other = Tally(scan=scan)
            self.entry.add(other)
        return self.entry
