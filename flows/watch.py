"""Watch a source URL; when its files change, emit ``conveyor.dataset.landed`` for the event-driven
deployment.

The last fingerprint seen is kept under the storage root (``watch/<hash>.json``),
so the watcher is stateless between runs and works on any fsspec store.

    python -m conveyor.flows.watch SOURCE_URL [--storage-url URL]
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from prefect import flow, get_run_logger
from prefect.events import emit_event

from conveyor import operator
from conveyor.resources import open_store, options_for
from conveyor.settings import DEFAULT_STORAGE
from conveyor.store.storage import exists, read_json, write_json_atomic

LANDED = "conveyor.dataset.landed"  # new training data: the on-new-data deployment retrains
SCORING_LANDED = "conveyor.scoring.landed"  # new rows to score: the score-new-data deployment scores them
EVENTS = (LANDED, SCORING_LANDED)


@dataclass(frozen=True)
class WatchResult:
    source_url: str
    fingerprint: str
    changed: bool
    files: int


def fingerprint(source_url: str) -> tuple[str, int]:
    """A hash of every file's path, size and store-specific change key under ``source_url``."""
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(source_url, **options_for(source_url))
    found = fs.find(path, detail=True) if fs.isdir(path) else {path: fs.info(path)}
    digest = hashlib.sha256()
    for name in sorted(found):
        digest.update(f"{name}|{found[name].get('size')}|{fs.ukey(name)}".encode())
    return digest.hexdigest()[:16], len(found)


@flow(name="conveyor-watch-source")
def watch_source(source_url: str, storage_url: str = DEFAULT_STORAGE, event: str = LANDED) -> WatchResult:
    """Emit a landed event when the files under ``source_url`` differ from the last run's."""
    source_url = operator.confine_url(source_url, "source")  # a schedule's parameters come from the form too
    storage_url = operator.confine_url(storage_url, "storage")
    logger = get_run_logger()
    store = open_store(storage_url)
    state_url = store.url("watch", hashlib.sha256(source_url.encode()).hexdigest()[:16] + ".json")
    current, files = fingerprint(source_url)
    previous = read_json(store, state_url)["fingerprint"] if exists(store, state_url) else None
    changed = current != previous
    if changed:
        if event not in EVENTS:
            raise ValueError(f"event must be one of {', '.join(EVENTS)}, not {event!r}")
        emit_event(
            event=event,
            resource={"prefect.resource.id": source_url, "conveyor.fingerprint": current},
            payload={"files": files, "previous": previous},
        )
        logger.info("%s changed (%d files, fingerprint %s): emitted %s", source_url, files, current, event)
        write_json_atomic(
            store, state_url, {"source_url": source_url, "fingerprint": current, "files": files}
        )
    else:
        logger.info("%s unchanged (%d files)", source_url, files)
    return WatchResult(source_url, current, changed, files)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source_url")
    parser.add_argument("--storage-url", default=DEFAULT_STORAGE)
    args = parser.parse_args()
    print(watch_source(args.source_url, args.storage_url))
