"""The model server: FastAPI under uvicorn, serving the champion and hot-reloading it safely.

    conveyor serve --storage-url URL --model flights_late [--port 8000] [--poll-seconds 5] [--workers N]

Endpoints: ``POST /predict`` takes raw rows shaped like the spec's main table
(``{"rows": [{"carrier": "EV", "origin": "LGA", ...}]}``, no label) and
computes the features server-side with the spec's own code (typing, rules,
lookup joins against the lookup tables committed with the model's training
data, derived columns: conveyor.tasks.inference); a row that would be
quarantined is a 422 naming the rule. ``POST /predict/features`` takes
feature rows for clients that already hold feature vectors. ``GET /model``
(version and card), ``GET /health`` (no auth, for probes: a status word and
versions, never paths or error text), ``GET /openapi.json`` (both request
bodies typed from the live model's card: every field, its type and allowed
values).

Both prediction routes also take a batch by column, ``{"columns": {"carrier": ["EV", "UA"],
...}}`` (one list per field, one value per row), checked as its rows would be, with each 422 at
``["body", "columns", field, row]``. Feature columns go straight into the model's matrix: a
1,000-row batch parses and encodes in about half the time of the same rows as objects.

``conveyor serve`` runs one server process per core (``--workers``): each loads the model, watches
the alias and enforces the token and limits below on its own, and a batch's CPU work does not
queue on one interpreter's lock. ``CONVEYOR_SERVING_MAX_CONCURRENCY`` applies per process.

Closed by default: without ``CONVEYOR_SERVING_TOKEN`` the server refuses to
start, unless ``--insecure-no-token`` says so explicitly, and then only on a
loopback address. With the token, ``/predict``, ``/model`` and
``/openapi.json`` need ``Authorization: Bearer <token>``; ``/docs`` and
``/redoc`` are off.

``/predict`` reads at most ``CONVEYOR_SERVING_MAX_BODY_BYTES`` (413), takes
``application/json`` only (415, so a cross-site form cannot drive it), answers
422 for anything out of type or range (never 500), and runs at most
``CONVEYOR_SERVING_MAX_CONCURRENCY`` requests at once (503 past it).

Hot reload: a watcher thread polls the alias pointer; a new version is loaded
and smoke-tested *before* one reference swap makes it live, so a request sees
either the old model or the new one, never a half-loaded one. A version that
fails to load, for whatever reason, is never swapped in: the old model keeps
serving, an alert of kind ``serving.reload_failed`` goes out once for that
version (from each server process), and ``/health`` says ``stale``. The watcher outlives any error.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import hmac
import json
import logging
import math
import os
import socket
import threading
import time
from asyncio import selector_events
from collections.abc import Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from fastapi import (  # module level: FastAPI resolves annotations here
    Depends,
    FastAPI,
    HTTPException,
    Request,
)
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from conveyor import operator
from conveyor.settings import SERVING_HOST, SERVING_POLL_SECONDS, SERVING_PORT
from conveyor.store.registry import CHAMPION, read_alias
from conveyor.store.storage import Store
from conveyor.tasks.loading import LoadedModel, load_model

logger = logging.getLogger("conveyor.serve")

TOKEN_ENV = "CONVEYOR_SERVING_TOKEN"
MAX_ROWS = 10_000  # per request: a larger batch belongs to the batch scoring flow
FLOAT32_MAX = 3.4028234663852886e38  # numpy.finfo(numpy.float32).max: larger values become inf
JSON_TYPES = ("application/json",)
# A body this small is a few rows: parsed, encoded and scored on the event loop in well under a
# millisecond, quicker than the hop to a worker thread. Anything slower goes to the thread pool.
INLINE_BYTES = 16_384
# Feature rows take numpy all the way: ~1,000 rows (160 KB as columns, 440 KB as rows) are a few
# milliseconds of work. With one server process per core that is cheaper on the event loop than in
# a thread, whose GIL handoffs with the loop cost ~1 ms of CPU per such request (measured).
INLINE_FEATURE_BYTES = 524_288
UNAUTHORIZED = "missing or wrong bearer token"
TOO_MANY_ROWS = f"at most {MAX_ROWS} rows per request; use `conveyor score` for batches"
# orjson reads integers past 64 bits as floats; json keeps them. A body with a run of 19 digits goes
# to json. The run is found in the body with every digit made "0" and all else " ": two C passes,
# where a regex backtracks through every digit of every number (milliseconds for a batch).
LONG_INTEGER = b"0" * 19
DIGITS_AS_ZERO = bytes(ord("0") if ord("0") <= i <= ord("9") else ord(" ") for i in range(256))


class ServingConfigError(RuntimeError):
    """The server would start open or misconfigured: refused, with what to set."""


def _default_alert(kind: str, title: str, details: dict[str, Any]) -> None:
    from conveyor.alerts import Alert, send_alert

    send_alert(Alert(kind=kind, title=title, details=details))


@dataclass
class ModelHolder:
    """The live model behind one reference; the watcher replaces it, requests read it once."""

    store: Store
    model: str
    alias: str = CHAMPION
    alert: Callable[[str, str, dict[str, Any]], None] = _default_alert
    current: LoadedModel | None = None
    failed_version: str | None = None  # the newest version that failed to load
    problem: str = ""  # a status word for /health: "", "reload_failed", "alias_unreadable", "check_failed"
    last_error: str = ""  # the full text, for logs and alerts only (it may hold storage paths)
    last_check: float = 0.0
    reloads: int = 0
    alerted: set[str] = field(default_factory=set)  # versions already alerted about: once each
    featurizers: dict[str, Any] = field(default_factory=dict)  # version -> (Featurizer, FastEncoder)
    codes: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # version -> category codes
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def featurizer(self, model: LoadedModel) -> Any:
        """The raw-row featurizer of ``model`` (its spec and lookup tables), built once per version."""
        return self._raw(model)[0]

    def encoder(self, model: LoadedModel) -> Any:
        """The raw-row fast encoder of ``model`` (``conveyor.tasks.inference.FastEncoder``)."""
        return self._raw(model)[1]

    def _raw(self, model: LoadedModel) -> tuple[Any, Any]:
        from conveyor.tasks.inference import FastEncoder, featurizer_for_card

        found = self.featurizers.get(model.version)
        if found is None:
            featurizer = featurizer_for_card(self.store, model.card)
            found = (featurizer, FastEncoder(featurizer, model.features, model.categories))
            if found[1].problem:
                logger.info(
                    "raw rows of %s %s take the pandas path: %s", model.model, model.version, found[1].problem
                )
            self.featurizers = {model.version: found}  # one live version: drop the old one's lookups
        return found

    def category_codes(self, model: LoadedModel) -> dict[str, dict[str, float]]:
        """Level -> code of each categorical feature of ``model``, built once per version."""
        from conveyor.tasks.scoring import category_codes

        found = self.codes.get(model.version)
        if found is None:
            found = category_codes(model.categories)
            self.codes = {model.version: found}
        return found

    @property
    def status(self) -> str:
        """``ok``, ``stale`` (serving, but not what the alias says or could not check), or ``no_model``."""
        if self.current is None:
            return "no_model"
        return "stale" if self.problem else "ok"

    def check(self) -> bool:
        """Load the alias's version if it changed; True if a new model went live. Never raises."""
        with self._lock:  # one reload at a time; requests never take this lock
            self.last_check = time.time()
            try:
                return self._check()
            except Exception as exc:  # a bug or a surprise in stored data must not end the watcher
                self.problem, self.last_error = "check_failed", f"{type(exc).__name__}: {exc}"
                logger.exception("checking %s/%s failed; still serving", self.model, self.alias)
                return False

    def _check(self) -> bool:
        try:
            pointer = read_alias(self.store, self.model, self.alias)
        except Exception as exc:  # a flaky store must not take the server down
            self.problem = "alias_unreadable"
            self.last_error = f"cannot read the {self.alias} alias: {type(exc).__name__}: {exc}"
            logger.warning("%s", self.last_error)
            return False
        if pointer is None:
            if self.current is None:
                self.last_error = f"model {self.model} has no {self.alias!r} alias yet"
            return False
        live = self.current.version if self.current else None
        if pointer.version == live:
            self.failed_version, self.problem, self.last_error = (
                None,
                "",
                "",
            )  # e.g. moved back after a bad push
            return False
        if pointer.version == self.failed_version:
            return False
        try:
            loaded = load_model(self.store, self.model, pointer.version)
        except Exception as exc:  # ModelLoadError, or anything a damaged card can provoke
            self._failed(pointer.version, live, exc)
            return False
        self.current = loaded  # the atomic swap: one reference assignment
        self.failed_version, self.problem, self.last_error = None, "", ""
        self.reloads += 1
        logger.info("now serving %s %s", self.model, loaded.version)
        return True

    def _failed(self, version: str, live: str | None, exc: Exception) -> None:
        self.failed_version, self.problem = version, "reload_failed"
        self.last_error = f"{type(exc).__name__}: {exc}"
        logger.error(
            "reload of %s %s failed; still serving %s: %s", self.model, version, live, self.last_error
        )
        if version in self.alerted:
            return
        self.alerted.add(version)
        try:
            self.alert(
                "serving.reload_failed",
                f"{self.model}: version {version} failed to load; still serving {live}",
                {"model": self.model, "version": version, "serving": live, "error": self.last_error},
            )
        except Exception:  # alerting is best effort; the watcher goes on
            logger.exception("ALERT NOT DELIVERED: serving.reload_failed for %s %s", self.model, version)


class Watcher:
    """Polls the alias every ``poll_seconds`` in a daemon thread until stopped."""

    def __init__(self, holder: ModelHolder, poll_seconds: float):
        self.holder, self.poll_seconds = holder, poll_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="conveyor-model-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.holder.check()
            except Exception:  # check() does not raise; this keeps the loop alive even if that changes
                logger.exception("model watcher: unexpected error; polling on")

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)


def resolve_token(token: str | None = None, insecure_no_token: bool = False) -> str | None:
    """The bearer token (argument, else ``CONVEYOR_SERVING_TOKEN``); None only when explicitly allowed.

    Raises :class:`ServingConfigError` for no token (without ``insecure_no_token``)
    and for a placeholder or short token.
    """
    token = (token if token is not None else os.environ.get(TOKEN_ENV, "")).strip()
    if token:
        problem = operator.secret_problem(TOKEN_ENV, token)
        if problem:
            raise ServingConfigError(f"{problem}; refusing to start")
        return token
    if not insecure_no_token:
        raise ServingConfigError(
            f"{TOKEN_ENV} is not set: refusing to serve predictions to anyone who asks. Set it, or pass "
            "--insecure-no-token to serve without one on a loopback address"
        )
    return None


def check_bind(app: Any, host: str) -> None:
    """An app without a token may listen on loopback only."""
    _check_host(getattr(app.state, "open_without_token", False), host)


def _check_host(open_without_token: bool, host: str) -> None:
    if open_without_token and not operator.is_loopback(host):
        raise ServingConfigError(f"without {TOKEN_ENV} the server listens on loopback only, not {host!r}")


class NeedsThread(Exception):
    """Raised by inline work that found it has slow work to do: run it again off the event loop."""


class Rejected(Exception):
    """A request refused before it reaches the model: the status and FastAPI-shaped detail."""

    def __init__(self, status: int, detail: Any):
        super().__init__(status, detail)
        self.status, self.detail = status, detail

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status == 503 else None
        return JSONResponse(status_code=self.status, content={"detail": self.detail}, headers=headers)


def _error(loc: list[Any], msg: str, kind: str) -> list[dict[str, Any]]:
    return [{"loc": loc, "msg": msg, "type": kind}]


def is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media in JSON_TYPES


def _value_errors(rows: Any, model: LoadedModel) -> list[Any]:
    """What the schema check lets through but the frame cannot hold: numbers past float32 (``1e39``
    would become inf and be scored; a 400-digit integer overflows ``float``) and strings that are not
    Unicode text (JSON allows a lone surrogate, ``"\\ud800"``; Arrow refuses it). Everything else is
    :func:`conveyor.tasks.scoring.validate_rows`'s."""
    from conveyor.tasks.scoring import MAX_ERRORS, FieldError

    errors: list[Any] = []
    if not isinstance(rows, list):
        return errors
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            continue
        for name in model.features:
            value = row.get(name)
            if isinstance(value, str):
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    errors.append(
                        FieldError(i, name, f"field '{name}' is not valid Unicode text", "string_unicode")
                    )
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or name in model.categories:
                continue
            if isinstance(value, float) and not math.isfinite(value):
                continue  # validate_rows names it: "must be a finite number"
            if not -FLOAT32_MAX <= value <= FLOAT32_MAX:
                msg = f"field '{name}' is out of range (|value| <= {FLOAT32_MAX:.4g})"
                errors.append(FieldError(i, name, msg, "float_range"))
        if len(errors) >= MAX_ERRORS:
            break
    return errors[:MAX_ERRORS]


def _loads(body: bytes) -> tuple[Any, bool]:
    """The body's JSON, and whether its floats are all finite. orjson where it reads the body as ``json``
    would (most bodies, several times faster; it refuses NaN and infinities, so its floats are finite);
    else ``json``, whose errors and big integers the 422s and range checks are written against."""
    if LONG_INTEGER not in body.translate(DIGITS_AS_ZERO):
        try:
            return orjson.loads(body), True
        except orjson.JSONDecodeError:  # NaN, lone surrogates, deep nesting, other encodings: json decides
            pass
    return json.loads(body), False


def _decode_rows(body: bytes, content_type: str | None, max_bytes: int) -> Any:
    """The ``rows`` of a JSON body, not yet checked; :class:`Rejected` for 415, 413 and undecodable JSON."""
    if not is_json(content_type):
        raise Rejected(415, "send the rows as application/json")
    if len(body) > max_bytes:
        raise Rejected(413, f"the body is larger than {max_bytes} bytes")
    try:
        data, finite = _loads(body)
    except RecursionError:
        raise Rejected(422, _error(["body"], "JSON is nested too deeply", "json_invalid")) from None
    except ValueError:  # also UnicodeDecodeError, and integers past Python's 4300-digit limit
        raise Rejected(422, _error(["body"], "body is not valid JSON", "json_invalid")) from None
    if isinstance(data, dict) and "columns" in data:
        return _columns(data, finite)
    rows = data.get("rows") if isinstance(data, dict) else data
    if isinstance(rows, list) and len(rows) > MAX_ROWS:
        raise Rejected(422, _error(["body", "rows"], TOO_MANY_ROWS, "too_long"))
    return rows


@dataclass(frozen=True)
class Columns:
    """A columnar body, ``{"columns": {"name": [one value per row, ...], ...}}``: every list one length."""

    values: dict[str, list[Any]]
    n: int
    finite: bool = False  # every float is finite: a NaN in a column's array can only be a null

    def rows(self) -> list[dict[str, Any]]:
        """The same batch as row objects, for validation and the general paths."""
        names = list(self.values)
        return [dict(zip(names, row, strict=True)) for row in zip(*self.values.values(), strict=True)]


def _columns(data: dict[str, Any], finite: bool = False) -> Columns:
    """The columns of a columnar body, their shape checked; else :class:`Rejected` (422) naming the column."""
    if "rows" in data:
        raise Rejected(422, _error(["body"], "send rows or columns, not both", "value_error"))
    columns = data["columns"]
    if not isinstance(columns, dict) or not columns:
        msg = "must be a non-empty object of field: list of values (one per row)"
        raise Rejected(422, _error(["body", "columns"], msg, "dict_type"))
    n = None
    for name, values in columns.items():
        if not isinstance(values, list):
            msg = "must be a list of values, one per row"
            raise Rejected(422, _error(["body", "columns", name], msg, "list_type"))
        if n is None:
            first, n = name, len(values)
        elif len(values) != n:
            msg = f"has {len(values)} values but '{first}' has {n}: every column holds one value per row"
            raise Rejected(422, _error(["body", "columns", name], msg, "value_error"))
    if not n:
        raise Rejected(422, _error(["body", "columns"], "must hold at least one row", "too_short"))
    if n > MAX_ROWS:
        raise Rejected(422, _error(["body", "columns"], TOO_MANY_ROWS, "too_long"))
    return Columns(columns, n, finite)


@contextmanager
def _located_in_columns() -> Iterator[None]:
    """Row checks run on a columnar body's rows: their 422s name ``["body", "columns", field, row]``."""
    try:
        yield
    except Rejected as rejected:
        if not isinstance(rejected.detail, list):
            raise
        details = []
        for d in rejected.detail:
            loc = d["loc"]
            if len(loc) == 4 and loc[:2] == ["body", "rows"]:
                d = d | {"loc": ["body", "columns", loc[3], loc[2]]}
            details.append(d)
        raise Rejected(rejected.status, details) from None


def parse_predict_body(
    body: bytes, content_type: str | None, model: LoadedModel, max_bytes: int
) -> list[dict[str, Any]]:
    """The request's rows, validated against the model's schema; else :class:`Rejected` (413, 415, 422).

    Pure and total over any bytes: the property tests feed it arbitrary input. A columnar body comes
    back as its rows.
    """
    return _checked_rows(_decode_rows(body, content_type, max_bytes), model)


def encode_predict_body(
    body: bytes,
    content_type: str | None,
    model: LoadedModel,
    max_bytes: int,
    codes: dict[str, dict[str, float]],
    fallback: bool = True,
) -> Any:
    """The request's rows as the model's float32 feature matrix; else :class:`Rejected` as
    :func:`parse_predict_body`. Plainly valid rows go straight into numpy; any other body takes
    :func:`parse_predict_body` and ``rows_to_frame``, so errors and edge cases are theirs (without
    ``fallback``, :class:`NeedsThread` instead: that path is pandas, milliseconds per batch)."""
    from conveyor.tasks.inference import feature_columns_matrix
    from conveyor.tasks.scoring import feature_matrix, rows_to_frame

    rows = _decode_rows(body, content_type, max_bytes)
    if isinstance(rows, Columns):
        matrix = feature_columns_matrix(rows.values, model.features, codes, finite=rows.finite)
    else:
        matrix = feature_matrix(rows, model, codes)
    if matrix is not None:
        return matrix
    if not fallback:
        raise NeedsThread
    rows = _checked_rows(rows, model)
    return rows_to_frame(rows, model).to_numpy(dtype="float32")


def _checked_rows(rows: Any, model: LoadedModel) -> list[dict[str, Any]]:
    """The rows (a columnar body's as rows), valid for ``model``; else :class:`Rejected` (422)."""
    from conveyor.tasks.scoring import validate_rows

    if isinstance(rows, Columns):
        missing = [name for name in model.features if name not in rows.values]
        if missing:
            msgs = [(["body", "columns", name], f"field '{name}' is required") for name in missing]
            raise Rejected(422, [{"loc": loc, "msg": msg, "type": "missing"} for loc, msg in msgs])
        with _located_in_columns():
            return _checked_rows(rows.rows(), model)
    errors = _value_errors(rows, model) or validate_rows(rows, model)
    if errors:
        raise Rejected(422, [e.detail() for e in errors])
    return rows


def parse_json_rows(body: bytes, content_type: str | None, max_bytes: int) -> list[Any] | Columns:
    """The ``rows`` list of a JSON body, or its :class:`Columns` (413, 415 and 422 as
    :func:`parse_predict_body`), unvalidated."""
    rows = _decode_rows(body, content_type, max_bytes)
    if isinstance(rows, Columns):
        return rows
    if not isinstance(rows, list) or not rows:
        raise Rejected(422, _error(["body", "rows"], "must be a non-empty list of records", "list_type"))
    return rows


_JSON_TYPES = {"int": "integer", "float": "number", "str": "string", "timestamp": "string", "bool": "boolean"}


def _rows_schema(properties: dict[str, Any], required: list[str], title: str) -> dict[str, Any]:
    """``{"rows": [{field: value}, ...]}``, or the same batch as ``{"columns": {field: [value, ...]}}``."""
    row = {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
    rows = {"type": "array", "minItems": 1, "maxItems": MAX_ROWS}
    columns = {
        "type": "object",
        "description": "the batch by column: one list per field, one value per row, every list one length",
        "properties": {name: rows | {"items": prop} for name, prop in properties.items()},
        "required": required,
        "additionalProperties": False,
    }
    return {
        "title": title,
        "type": "object",
        "oneOf": [{"required": ["rows"]}, {"required": ["columns"]}],
        "properties": {"rows": rows | {"items": row}, "columns": columns},
    }


def typed_openapi(document: dict[str, Any], holder: ModelHolder) -> dict[str, Any]:
    """The OpenAPI document with both request bodies typed from the live model (generated clients and
    fuzzers can use it): each raw field and feature with its type, allowed values and whether it may be
    null. Rebuilt per call, so it follows a hot reload."""
    model = holder.current
    if model is None:
        return document
    feature_props: dict[str, Any] = {}
    for name in model.features:
        if name in model.categories:
            feature_props[name] = {
                "type": ["string", "null"],
                "enum": [*model.categories[name], None],
                "description": "categorical; a value unseen in training is scored as missing",
            }
        else:
            feature_props[name] = {"type": ["number", "null"], "format": "float"}
    bodies = {"/predict/features": _rows_schema(feature_props, list(model.features), "FeatureRows")}
    try:
        featurizer = holder.featurizer(model)
    except Exception:  # a model trained before specs: feature rows only
        featurizer = None
    if featurizer is not None:
        raw_props = {}
        for column in featurizer.raw_schema.columns:
            kind = _JSON_TYPES.get(column.kind, "string")
            required = column.name in featurizer.required
            prop: dict[str, Any] = {"type": kind if required else [kind, "null"]}
            if column.kind == "timestamp":
                prop["format"] = "date-time"
            feature_levels = model.categories.get(column.name)
            if feature_levels:
                prop["description"] = (
                    f"one of {len(feature_levels)} values seen in training (others score as missing)"
                )
            raw_props[column.name] = prop
        bodies["/predict"] = _rows_schema(raw_props, featurizer.required, "RawRows")
    for path, schema in bodies.items():
        operation = document.get("paths", {}).get(path, {}).get("post")
        if operation is not None:
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
    return document


class Disconnected(Exception):
    """The client went away before its request was read: there is no one to answer."""


async def read_body(receive: Receive, declared: str | None, max_bytes: int) -> bytes:
    """The body, read in chunks and abandoned past ``max_bytes`` (never buffered whole first);
    ``declared`` is the request's Content-Length."""
    if declared is not None:
        if not declared.isdigit():
            raise Rejected(400, "invalid Content-Length")
        if int(declared) > max_bytes:
            raise Rejected(413, f"the body is larger than {max_bytes} bytes")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Disconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise Rejected(413, f"the body is larger than {max_bytes} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _prediction_headers(headers: list[tuple[bytes, bytes]]) -> tuple[str, str | None, str | None]:
    """Authorization (``""`` if absent), Content-Type and Content-Length of an ASGI request: the first
    of each, as Starlette's ``Headers.get`` reads them."""
    authorization = content_type = content_length = None
    for name, value in headers:
        if name == b"authorization":
            authorization = authorization if authorization is not None else value.decode("latin-1")
        elif name == b"content-type":
            content_type = content_type if content_type is not None else value.decode("latin-1")
        elif name == b"content-length":
            content_length = content_length if content_length is not None else value.decode("latin-1")
    return authorization or "", content_type, content_length


class ServingApp(FastAPI):
    """FastAPI, with a POST to a prediction route handed straight to that route's ASGI handler
    (``direct``), ahead of FastAPI's middleware, routing, dependency injection and response classes:
    they cost ~0.3 ms of CPU per request, a quarter of a one-row request's (measured). The routes stay
    declared in FastAPI, for the OpenAPI document, and answer the same through it. Middleware added
    to the app does not see these requests: the handlers check the token and limits themselves."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.direct: dict[str, Callable[[Scope, Receive, Send], Awaitable[None]]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            handler = self.direct.get(scope["path"])
            if handler is not None:
                await handler(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


class _Handled(Response):
    """The answer of a declared route that hands its request to an ASGI handler."""

    def __init__(self, handler: Callable[[Scope, Receive, Send], Awaitable[None]]):
        super().__init__()
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.handler(scope, receive, send)


def create_app(
    holder: ModelHolder,
    poll_seconds: float = SERVING_POLL_SECONDS,
    token: str | None = None,
    insecure_no_token: bool = False,
    own_process: bool = False,
) -> Any:
    """The FastAPI app; the first model is loaded at start-up, the watcher runs for the app's lifetime.

    ``own_process``: the app has its process to itself (``conveyor serve``). After start-up the heap
    is then collected once and frozen (``gc.freeze``): the libraries and the model are millions of
    objects, and a full collection that scans them pauses a request for ~100 ms (measured).

    Raises :class:`ServingConfigError` without a token unless ``insecure_no_token``.
    """
    from conveyor.tasks.scoring import predict_frame, predict_matrix, prediction_payload

    token = resolve_token(token, insecure_no_token)
    poll_seconds = operator.confine_seconds(poll_seconds, "poll")
    limits = operator.current()
    max_bytes, max_in_flight = limits.max_body_bytes, limits.max_concurrency

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        holder.check()
        warm_up()
        if own_process:
            gc.collect()
            gc.freeze()
        watcher = Watcher(holder, poll_seconds)
        watcher.start()
        try:
            yield
        finally:
            watcher.stop()

    app = ServingApp(
        title="Conveyor model server", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.open_without_token = token is None
    app.state.in_flight = 0  # /predict requests being handled; touched only on the event loop

    def token_ok(authorization: str) -> bool:
        if token is None:
            return True
        scheme, _, given = authorization.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())

    def authorized(request: Request) -> None:
        if not token_ok(request.headers.get("authorization", "")):
            raise HTTPException(status_code=401, detail=UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})

    def live_model() -> LoadedModel:
        model = holder.current
        if model is None:
            raise HTTPException(status_code=503, detail={"status": holder.status, "version": None})
        return model

    @app.get("/health")
    def health() -> dict[str, Any]:
        model = holder.current
        return {
            "status": holder.status,
            "problem": holder.problem or None,
            "model": holder.model,
            "alias": holder.alias,
            "version": model.version if model else None,
            "failed_version": holder.failed_version,
            "reloads": holder.reloads,
        }

    if token is not None:

        @app.get("/openapi.json", dependencies=[Depends(authorized)], include_in_schema=False)
        def openapi() -> JSONResponse:
            return JSONResponse(typed_openapi(app.openapi(), holder))

    @app.get("/model", dependencies=[Depends(authorized)])
    def model_info() -> dict[str, Any]:
        model = live_model()
        return {
            "model": model.model,
            "version": model.version,
            "loaded_at": model.loaded_at,
            "features": model.features,
            "card": model.card,
        }

    async def answer(
        scope: Scope,
        receive: Receive,
        work: Callable[[LoadedModel, bytes, str | None, bool], Response],
        inline_bytes: int,
    ) -> Response:
        """Checks shared by both prediction routes: the token (401), a live model (503), concurrency
        (503), media type (415), body size (413); then ``work``."""
        authorization, content_type, content_length = _prediction_headers(scope["headers"])
        if not token_ok(authorization):
            return JSONResponse({"detail": UNAUTHORIZED}, 401, {"WWW-Authenticate": "Bearer"})
        model = holder.current  # read once: this request uses this model even if a swap happens meanwhile
        if model is None:
            return JSONResponse({"detail": {"status": holder.status, "version": None}}, 503)
        if app.state.in_flight >= max_in_flight:
            return Rejected(503, f"busy: {max_in_flight} requests in flight; retry").response()
        app.state.in_flight += 1
        try:
            if not is_json(content_type):
                raise Rejected(415, "send the rows as application/json")
            body = await read_body(receive, content_length, max_bytes)
            if len(body) <= inline_bytes:
                try:
                    return work(model, body, content_type, True)
                except NeedsThread:
                    pass
            # Off the event loop: parsing, validation, features and prediction are CPU work.
            return await run_in_threadpool(work, model, body, content_type, False)
        except Rejected as rejected:
            return rejected.response()
        finally:
            app.state.in_flight -= 1

    def handler(
        work: Callable[[LoadedModel, bytes, str | None, bool], Response], inline_bytes: int = INLINE_BYTES
    ) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
        async def handle(scope: Scope, receive: Receive, send: Send) -> None:
            try:
                response = await answer(scope, receive, work, inline_bytes)
            except Disconnected:
                return
            await response(scope, receive, send)

        return handle

    def _answer(model: LoadedModel, values: Any, extra: dict[str, Any] | None = None) -> Response:
        body = {"model": model.model, "version": model.version, **prediction_payload(model, values)}
        return Response(orjson.dumps(body | (extra or {})), media_type="application/json")

    def warm_up() -> None:
        """A row of nulls through the feature route's code, as rows and as columns, before the first
        request: that one would otherwise pay ~30 ms of imports and first calls, and a process slow to
        answer a new connection is passed over for the others in a burst (:class:`SharedSocketLoop`)."""
        model = holder.current
        if model is None:
            return
        nulls = dict.fromkeys(model.features)
        try:
            for body in ({"rows": [nulls]}, {"columns": {name: [None] for name in nulls}}):
                predict_features(model, orjson.dumps(body), JSON_TYPES[0], True)
        except Exception:  # the model serves anyway; its first request is slower
            logger.warning("warm-up prediction of %s %s failed", model.model, model.version, exc_info=True)

    def predict_features(model: LoadedModel, body: bytes, content_type: str | None, inline: bool) -> Response:
        codes = holder.category_codes(model)
        fallback = not inline or len(body) <= INLINE_BYTES  # a batch's pandas path belongs in a thread
        matrix = encode_predict_body(body, content_type, model, max_bytes, codes, fallback)
        return _answer(model, predict_matrix(model, matrix))

    def predict_raw(model: LoadedModel, body: bytes, content_type: str | None, inline: bool) -> Response:
        rows = parse_json_rows(body, content_type, max_bytes)
        if isinstance(rows, Columns):
            with _located_in_columns():
                return raw_rows(model, rows.rows(), inline)
        return raw_rows(model, rows, inline)

    def raw_rows(model: LoadedModel, rows: list[Any], inline: bool) -> Response:
        from conveyor.tasks.inference import featurize_rows, request_problems
        from conveyor.tasks.scoring import encode_known

        if inline and model.version not in holder.featurizers:
            raise NeedsThread  # the first request of a version builds its featurizer: reads the lookups
        try:
            featurizer = holder.featurizer(model)
        except Exception as exc:  # a model trained before specs: no raw route for it
            logger.warning("no raw-row featurizer for %s %s: %s", model.model, model.version, exc)
            raise Rejected(
                409, "this model version takes feature rows only: POST /predict/features"
            ) from None
        bad = [i for i, row in enumerate(rows) if not isinstance(row, dict)]
        if bad:
            raise Rejected(422, _error(["body", "rows", bad[0]], "each row must be an object", "dict_type"))
        problems = request_problems(featurizer, rows)
        fast = None if problems else holder.encoder(model).encode(rows)
        if fast is not None:  # the spec over numpy arrays; None where only the pandas path can decide
            matrix, problems = fast
        elif not problems:
            if inline:
                raise NeedsThread  # pandas: milliseconds, not for the event loop
            features, problems = featurize_rows(featurizer, rows)
        if problems:
            raise Rejected(
                422,
                [
                    {"loc": ["body", "rows", p.row, p.field], "msg": p.msg, "type": "value_error"}
                    for p in problems[:20]
                ],
            )
        if fast is not None:
            values = predict_matrix(model, matrix)
        else:
            values = predict_frame(
                model, encode_known(features[model.features], model.categories)[model.features]
            )
        # The lookups are the tables committed with the training data: their versions say how fresh they are.
        return _answer(model, values, {"lookup_versions": featurizer.lookup_versions})

    app.direct = {
        "/predict": handler(predict_raw),
        "/predict/features": handler(predict_features, INLINE_FEATURE_BYTES),
    }

    @app.post("/predict")
    async def predict(request: Request) -> Any:
        """Raw rows shaped like the spec's main table (no label): features are computed here."""
        return _Handled(app.direct["/predict"])

    @app.post("/predict/features")
    async def predict_on_features(request: Request) -> Any:
        """Rows of the model's feature values (``GET /model`` lists them)."""
        return _Handled(app.direct["/predict/features"])

    return app


@dataclass
class RunningServer:
    """A uvicorn server in a background thread (tests, benchmarks); ``stop()`` ends it."""

    server: Any
    thread: threading.Thread
    url: str

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def uvicorn_config(app: Any, host: str, port: int, log_level: str = "warning", **options: Any) -> Any:
    """uvicorn's settings for this API; ``options`` (``workers``, ``factory``) pass through."""
    import uvicorn

    # No websockets: the API has none, and the websockets package warns on import.
    return uvicorn.Config(
        app, host=host, port=port, log_level=log_level, ws="none", lifespan="on", access_log=False, **options
    )


def start_in_thread(
    app: Any, host: str = "127.0.0.1", port: int = 0, ready_timeout: float = 60.0
) -> RunningServer:
    """Start uvicorn on a loopback port in a thread and wait until it accepts requests."""
    import uvicorn

    from conveyor.prefect_api import free_port

    check_bind(app, host)
    port = port or free_port()
    server = uvicorn.Server(uvicorn_config(app, host, port))
    thread = threading.Thread(target=server.run, name="conveyor-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + ready_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(timeout=10)
            raise RuntimeError(f"uvicorn did not start on {host}:{port}")
        time.sleep(0.05)
    return RunningServer(server, thread, f"http://{host}:{port}")


def default_workers() -> int:
    """One worker process per core this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def worker_app(storage_url: str, model: str, alias: str, poll_seconds: float, insecure_no_token: bool) -> Any:
    """The app of one server process: its own store, model holder and watcher.

    ``conveyor serve --workers N`` has uvicorn spawn N processes that each call this. The token
    and the operator's limits come from the environment every worker inherits, so each one
    enforces them as a single-process server does.
    """
    from conveyor.resources import open_store

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    holder = ModelHolder(open_store(storage_url), model, alias)
    return create_app(holder, poll_seconds, insecure_no_token=insecure_no_token, own_process=True)


def serve(
    storage_url: str,
    model: str,
    alias: str = CHAMPION,
    host: str = SERVING_HOST,
    port: int = SERVING_PORT,
    poll_seconds: float = SERVING_POLL_SECONDS,
    log_level: str = "info",
    insecure_no_token: bool = False,
    workers: int | None = None,
) -> None:
    """Run the server in the foreground until interrupted (the ``conveyor serve`` command).

    ``workers`` processes (default: one per core) share the port, so parsing, encoding and
    prediction of concurrent requests do not queue on one interpreter's GIL.
    """
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise ServingConfigError(f"--workers must be at least 1, not {workers}")
    # Refused here, before any worker starts: no token (without --insecure-no-token), a weak one, a
    # public address without one.
    open_without_token = resolve_token(None, insecure_no_token) is None
    _check_host(open_without_token, host)
    if open_without_token:
        logger.warning(
            "serving WITHOUT a token (--insecure-no-token) on %s: anyone on this host can predict", host
        )
    factory = functools.partial(worker_app, storage_url, model, alias, poll_seconds, insecure_no_token)
    if workers == 1:
        uvicorn.Server(uvicorn_config(factory(), host, port, log_level)).run()
        return
    from uvicorn.supervisors import Multiprocess

    config = uvicorn_config(
        factory, host, port, log_level, workers=workers, factory=True, loop=f"{__name__}:SharedSocketLoop"
    )
    Multiprocess(config, sockets=[_tcp_socket(config.bind_socket())]).run()


class SharedSocketLoop(asyncio.SelectorEventLoop):
    """The event loop of a server process that shares its listening socket with the others.

    asyncio accepts every queued connection when the socket wakes it, so the first process to wake
    takes a whole burst, and keep-alive connections stay where they land: with 3 of 4 clients on
    one of two processes that one is the bottleneck. One accept per wake-up is not enough either:
    every process wakes for a burst and the quickest loops round again before any of them has a
    request to work on (1:3 and 0:4 splits of four clients, measured). So after taking a connection
    a process takes no other until that one has had its first answer (or ``ACCEPT_PAUSE_S`` has
    passed, for a client that connects and says nothing): a process busy with a request leaves new
    connections to one that is free.
    """

    ACCEPT_PAUSE_S = 0.05
    _accepts = 0
    _paused: tuple[asyncio.TimerHandle, Callable[[], None]] | None = None

    def _accept_connection(
        self, protocol_factory, sock, sslcontext=None, server=None, backlog=100, *args, **kw
    ):  # type: ignore[no-untyped-def]
        accepts = self._accepts
        super()._accept_connection(protocol_factory, sock, sslcontext, server, 1, *args, **kw)
        if self._accepts == accepts:
            return  # another process took it
        if self._paused is not None:
            return  # paused already, by an accept on another listening socket
        self._remove_reader(sock.fileno())

        def serve_again() -> None:
            if server is not None and server.is_serving() and sock.fileno() != -1:
                self._start_serving(protocol_factory, sock, sslcontext, server, backlog, *args, **kw)

        self._paused = (self.call_later(self.ACCEPT_PAUSE_S, self._resume_accepting), serve_again)

    def _accept_connection2(self, *args, **kw):  # type: ignore[no-untyped-def]
        self._accepts += 1  # called (it makes the coroutine) once per connection accepted
        return super()._accept_connection2(*args, **kw)

    def _resume_accepting(self) -> None:
        if self._paused is not None:
            timer, serve_again = self._paused
            self._paused = None
            timer.cancel()
            serve_again()

    def _make_socket_transport(self, sock, protocol, waiter=None, *, extra=None, server=None):  # type: ignore[no-untyped-def]
        return _AnsweringTransport(self, sock, protocol, waiter, extra, server)


class _AnsweringTransport(selector_events._SelectorSocketTransport):
    """A connection's transport that tells its :class:`SharedSocketLoop` when it first answers or closes."""

    _fresh = True

    def write(self, data) -> None:  # type: ignore[no-untyped-def]
        super().write(data)
        self._answered()

    def _call_connection_lost(self, exc) -> None:  # type: ignore[no-untyped-def]
        try:
            super()._call_connection_lost(exc)
        finally:
            self._answered()

    def _answered(self) -> None:
        if self._fresh:
            self._fresh = False
            self._loop._resume_accepting()


def _tcp_socket(bound: socket.socket) -> socket.socket:
    """``bound`` labelled IPPROTO_TCP. asyncio turns ``TCP_NODELAY`` on for a connection only when its
    listening socket says so; uvicorn's bound socket says 0, and Nagle's algorithm then holds each
    response ~40 ms for the client's delayed ACK."""
    if bound.family not in (socket.AF_INET, socket.AF_INET6):
        return bound
    return socket.socket(bound.family, bound.type, socket.IPPROTO_TCP, fileno=bound.detach())
