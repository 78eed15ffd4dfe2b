"""Model registry on any fsspec store: immutable versions, aliases moved by compare-and-swap, append-only
history.

Layout under the store root::

    models/<model>/<version>/model.ubj                 the booster (UBJ, never pickle; model.json for a
    linear model)
    models/<model>/<version>/card.json                 written last and never rewritten: the version is
    registered
    models/<model>/aliases/<alias>.json                pointer (a cache of the newest history event)
    models/<model>/aliases/history/<alias>/<seq>.json  one event per move: who, when, why, from what

Why an event log and not only a pointer: two runs promoting at once must not
both win, and a plain "read pointer, write pointer" lets the second writer
silently undo the first. Moving an alias therefore means *creating* history
event ``seq + 1`` exclusively -- on local disk by hard-linking a complete temp
file (``link`` fails if the name exists), on S3 with a conditional PUT
(``If-None-Match: *``, s3fs ``pipe_file(mode="create")``; moto honours it too).
Exactly one writer creates a given event; the others get :class:`AliasConflict`.
The winner then replaces the pointer atomically (``os.replace`` / one PUT).
Readers follow the pointer forward to any newer event, so a crash between the
event and the pointer write, or a slow writer's late pointer write, can neither
hide nor undo a move.
"""

from __future__ import annotations

import getpass
import json
import os
import platform
import posixpath
import re
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from conveyor.store.storage import Store, exists, read_json, write_json_atomic

CARD = "card.json"
MODEL_FILE = "model.ubj"
CHAMPION = "champion"
ALIASES = "aliases"
SEQ_DIGITS = 10
ALIAS_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
ANY = object()  # sentinel: set_alias without an expected current version
FORCE_RETRIES = 5


class RegistryError(ValueError):
    """A model, version or alias does not exist or is not in a usable state."""


class AliasConflict(RuntimeError):
    """The alias moved under us: another writer won the compare-and-swap."""


class ModelLoadError(RuntimeError):
    """A registered artifact cannot be loaded or fails its smoke test."""


@dataclass(frozen=True)
class AliasEvent:
    """One move of an alias; the pointer file holds a copy of the newest one."""

    model: str
    alias: str
    version: str
    previous: str | None
    seq: int
    at: str
    by: str
    reason: str
    action: str = "promote"  # "promote", "rollback", "set"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AliasEvent:
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in data.items() if k in known}
        values.setdefault("seq", 0)  # pointers written before the event log had no sequence number
        values.setdefault("action", "promote")
        return cls(**values)


@dataclass(frozen=True)
class ModelVersion:
    model: str
    version: str
    url: str
    registered_at: str
    metrics: dict[str, Any] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)


def who() -> str:
    try:
        return f"{getpass.getuser()}@{platform.node()}"
    except Exception:  # no user database entry in some containers
        return "unknown"


# --- paths ---------------------------------------------------------------------------------


def version_url(store: Store, model: str, version: str) -> str:
    return store.model_url(model, version)


def card_url(store: Store, model: str, version: str) -> str:
    return posixpath.join(store.model_url(model, version), CARD)


def alias_url(store: Store, model: str, alias: str) -> str:
    return store.url("models", model, ALIASES, f"{alias}.json")


def history_url(store: Store, model: str, alias: str) -> str:
    return store.url("models", model, ALIASES, "history", alias)


def event_url(store: Store, model: str, alias: str, seq: int) -> str:
    return posixpath.join(history_url(store, model, alias), f"{seq:0{SEQ_DIGITS}d}.json")


# --- primitive: exclusive create -------------------------------------------------------------


def _is_local(store: Store) -> bool:
    protocol = store.fs.protocol
    protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol)
    return "file" in protocols or "local" in protocols


def create_exclusive(store: Store, url: str, data: bytes) -> None:
    """Publish ``data`` at ``url`` only if nothing is there yet; ``FileExistsError`` otherwise.

    Readers never see a partial object: locally the content is complete before the
    hard link gives it its name; on object stores one conditional PUT is atomic.
    """
    path = store.path(url)
    if _is_local(store):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        finally:
            os.unlink(tmp)
    else:
        store.fs.pipe_file(path, data, mode="create")


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True, default=str).encode()


# --- versions --------------------------------------------------------------------------------


def is_registered(store: Store, model: str, version: str) -> bool:
    return exists(store, card_url(store, model, version))


def read_card(store: Store, model: str, version: str) -> dict[str, Any]:
    url = card_url(store, model, version)
    if not exists(store, url):
        raise RegistryError(f"model {model} version {version} is not registered (no {url})")
    try:
        return read_json(store, url)
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{url}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def register_card(store: Store, model: str, version: str, card: dict[str, Any]) -> str:
    """Register a version by writing its card once; an existing card is kept (versions are immutable)."""
    url = card_url(store, model, version)
    model_file = card.get("model_file", MODEL_FILE)
    if not exists(store, posixpath.join(store.model_url(model, version), model_file)):
        raise RegistryError(
            f"{store.model_url(model, version)}: no {model_file}; train the model before registering it"
        )
    try:
        create_exclusive(store, url, _json_bytes(card))
    except FileExistsError:
        pass
    return url


def list_versions(store: Store, model: str) -> list[ModelVersion]:
    """Registered versions (those with a card), oldest first, with the aliases pointing at each."""
    fs = store.fs
    base = store.path(store.url("models", model))
    if not fs.exists(base):
        return []
    pointers = {a: p.version for a, p in list_aliases(store, model).items()}
    out = []
    for entry in fs.ls(base, detail=False):
        version = posixpath.basename(entry.rstrip("/"))
        if version == ALIASES or not is_registered(store, model, version):
            continue
        card = read_card(store, model, version)
        out.append(
            ModelVersion(
                model,
                version,
                store.model_url(model, version),
                str(card.get("registered_at", "")),
                dict(card.get("metrics", {})),
                sorted(a for a, v in pointers.items() if v == version),
            )
        )
    return sorted(out, key=lambda v: (v.registered_at, v.version))


# --- aliases ---------------------------------------------------------------------------------


def _check_alias(alias: str) -> None:
    if not ALIAS_NAME.match(alias):
        raise RegistryError(f"alias {alias!r} must match {ALIAS_NAME.pattern}")


def _read_event(store: Store, url: str) -> AliasEvent:
    return AliasEvent.from_json(read_json(store, url))


def read_alias(store: Store, model: str, alias: str = CHAMPION) -> AliasEvent | None:
    """The alias as of the newest history event (the pointer, followed forward if it lags)."""
    url = alias_url(store, model, alias)
    current = _read_event(store, url) if exists(store, url) else None
    seq = current.seq if current else 0
    while exists(store, event_url(store, model, alias, seq + 1)):
        seq += 1
        current = _read_event(store, event_url(store, model, alias, seq))
    return current


def get_alias(store: Store, model: str, alias: str = CHAMPION) -> dict[str, Any] | None:
    """The alias as a plain dict (``version``, ``previous``, ``at``, ``by``, ``reason``...), or None."""
    event = read_alias(store, model, alias)
    return asdict(event) if event else None


def list_aliases(store: Store, model: str) -> dict[str, AliasEvent]:
    fs = store.fs
    base = store.path(store.url("models", model, ALIASES))
    if not fs.exists(base):
        return {}
    names = [posixpath.basename(p)[: -len(".json")] for p in fs.glob(posixpath.join(base, "*.json"))]
    out = {}
    for name in sorted(names):
        event = read_alias(store, model, name)
        if event:
            out[name] = event
    return out


def alias_history(store: Store, model: str, alias: str = CHAMPION) -> list[AliasEvent]:
    """Every move of the alias, oldest first (events from before the numbered log come first)."""
    fs = store.fs
    base = store.path(history_url(store, model, alias))
    if not fs.exists(base):
        return []
    paths = sorted(p for p in fs.glob(posixpath.join(base, "*.json")))
    numbered = [p for p in paths if posixpath.basename(p)[:-5].isdigit()]
    legacy = [p for p in paths if p not in numbered]
    events = []
    for p in [*legacy, *numbered]:
        with fs.open(p, "rb") as fh:
            events.append(AliasEvent.from_json(json.load(fh)))
    return events


def set_alias(
    store: Store,
    model: str,
    alias: str,
    version: str,
    reason: str,
    expected: Any = ANY,
    action: str = "set",
    by: str | None = None,
) -> AliasEvent:
    """Point ``alias`` at a registered ``version`` by compare-and-swap.

    ``expected`` is the version the caller believes the alias points at now
    (``None``: not set yet). If it points elsewhere, or another writer moves it
    at the same moment, :class:`AliasConflict` is raised and nothing changes.
    Without ``expected`` the move is retried on top of concurrent moves.
    """
    _check_alias(alias)
    if not is_registered(store, model, version):
        raise RegistryError(f"model {model} version {version} is not registered (no {CARD})")
    attempts = 1 if expected is not ANY else FORCE_RETRIES
    for attempt in range(attempts):
        current = read_alias(store, model, alias)
        current_version = current.version if current else None
        if expected is not ANY and current_version != expected:
            raise AliasConflict(
                f"{model}/{alias} points at {current_version}, not the expected {expected}; "
                f"it was moved by {current.by if current else '?'} at {current.at if current else '?'}"
            )
        event = AliasEvent(
            model=model,
            alias=alias,
            version=version,
            previous=current_version,
            seq=(current.seq if current else 0) + 1,
            at=datetime.now(UTC).isoformat(timespec="microseconds"),
            by=by or who(),
            reason=reason,
            action=action,
        )
        try:
            create_exclusive(store, event_url(store, model, alias, event.seq), _json_bytes(asdict(event)))
        except FileExistsError:
            if attempt + 1 < attempts:
                continue
            raise AliasConflict(
                f"{model}/{alias}: another writer moved it at the same moment (event {event.seq} "
                "already exists); nothing changed"
            ) from None
        write_json_atomic(store, alias_url(store, model, alias), asdict(event))
        return event
    raise AssertionError("unreachable")


def rollback_target(history: list[AliasEvent]) -> str | None:
    """The version to fall back to: the newest earlier one that was not itself rolled back from.

    A rollback marks the version it leaves as bad until it is promoted again, so
    rolling back twice walks further back instead of flip-flopping.
    """
    if not history:
        return None
    bad: set[str] = set()
    for event in history:
        if event.action == "rollback" and event.previous:
            bad.add(event.previous)
        elif event.action != "rollback":
            bad.discard(event.version)
    current = history[-1].version
    for event in reversed(history):
        if event.version != current and event.version not in bad:
            return event.version
    return None


def rollback(
    store: Store,
    model: str,
    to: str | None = None,
    alias: str = CHAMPION,
    reason: str = "",
    by: str | None = None,
) -> AliasEvent:
    """Move ``alias`` back to the previous good version (or to ``to``), recorded as a rollback."""
    current = read_alias(store, model, alias)
    if current is None:
        raise RegistryError(f"{model}/{alias} is not set; nothing to roll back")
    target = to or rollback_target(alias_history(store, model, alias))
    if target is None:
        raise RegistryError(f"{model}/{alias}: no earlier version in its history to roll back to")
    if target == current.version:
        raise RegistryError(f"{model}/{alias} already points at {target}")
    why = reason or f"rollback from {current.version} to {target}"
    return set_alias(store, model, alias, target, why, expected=current.version, action="rollback", by=by)
