"""The model server: FastAPI under uvicorn, serving the champion and hot-reloading it safely.

    conveyor serve --storage-url URL --model flights_late [--port 8000] [--poll-seconds 5]

Endpoints: ``POST /predict`` (``{"rows": [{feature: value, ...}, ...]}``),
``GET /model`` (version and card), ``GET /health`` (no auth, for probes).
With ``CONVEYOR_SERVING_TOKEN`` set, ``/predict`` and ``/model`` need
``Authorization: Bearer <token>``.

Hot reload: a watcher thread polls the alias pointer; a new version is loaded
and smoke-tested *before* one reference swap makes it live, so a request sees
either the old model or the new one, never a half-loaded one. A version that
fails to load is never swapped in: the old model keeps serving, an alert of
kind ``serving.reload_failed`` goes out once for that version, and ``/health``
reports it.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import (  # module level: FastAPI resolves annotations here
    Depends,
    FastAPI,
    HTTPException,
    Request,
)
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from conveyor.settings import SERVING_HOST, SERVING_POLL_SECONDS, SERVING_PORT
from conveyor.store.registry import CHAMPION, ModelLoadError, read_alias
from conveyor.store.storage import Store
from conveyor.tasks.loading import LoadedModel, load_model

logger = logging.getLogger("conveyor.serve")

TOKEN_ENV = "CONVEYOR_SERVING_TOKEN"
MAX_ROWS = 10_000  # per request: a larger batch belongs to the batch scoring flow


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
    failed_version: str | None = None  # the newest version that failed to load (alerted once)
    last_error: str = ""
    last_check: float = 0.0
    reloads: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def check(self) -> bool:
        """Load the alias's version if it changed; True if a new model went live."""
        with self._lock:  # one reload at a time; requests never take this lock
            self.last_check = time.time()
            try:
                pointer = read_alias(self.store, self.model, self.alias)
            except Exception as exc:  # a flaky store must not take the server down
                self.last_error = f"cannot read the {self.alias} alias: {type(exc).__name__}: {exc}"
                logger.warning("%s", self.last_error)
                return False
            if pointer is None:
                if self.current is None:
                    self.last_error = f"model {self.model} has no {self.alias!r} alias yet"
                return False
            live = self.current.version if self.current else None
            if pointer.version == live:
                self.failed_version, self.last_error = (
                    None,
                    "",
                )  # e.g. the alias was moved back after a bad push
                return False
            if pointer.version == self.failed_version:
                return False
            try:
                loaded = load_model(self.store, self.model, pointer.version)
            except ModelLoadError as exc:
                self.failed_version = pointer.version
                self.last_error = str(exc)
                logger.error(
                    "reload of %s %s failed; still serving %s: %s", self.model, pointer.version, live, exc
                )
                self.alert(
                    "serving.reload_failed",
                    f"{self.model}: version {pointer.version} failed to load; still serving {live}",
                    {"model": self.model, "version": pointer.version, "serving": live, "error": str(exc)},
                )
                return False
            self.current = loaded  # the atomic swap: one reference assignment
            self.failed_version, self.last_error = None, ""
            self.reloads += 1
            logger.info("now serving %s %s", self.model, loaded.version)
            return True


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
            self.holder.check()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)


def create_app(holder: ModelHolder, poll_seconds: float = 5.0, token: str | None = None) -> Any:
    """The FastAPI app; the first model is loaded at start-up, the watcher runs for the app's lifetime."""
    from conveyor.tasks.scoring import predict_frame, rows_to_frame, validate_rows

    token = token if token is not None else (os.environ.get(TOKEN_ENV) or None)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        holder.check()
        watcher = Watcher(holder, poll_seconds)
        watcher.start()
        try:
            yield
        finally:
            watcher.stop()

    app = FastAPI(title="Conveyor model server", lifespan=lifespan)

    def authorized(request: Request) -> None:
        if token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise HTTPException(
                status_code=401,
                detail="missing or wrong bearer token",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def live_model() -> LoadedModel:
        model = holder.current
        if model is None:
            raise HTTPException(status_code=503, detail=f"no model loaded: {holder.last_error}")
        return model

    @app.get("/health")
    def health() -> dict[str, Any]:
        model = holder.current
        return {
            "status": "ok" if model else "no_model",
            "model": holder.model,
            "alias": holder.alias,
            "version": model.version if model else None,
            "reloads": holder.reloads,
            "reload_error": holder.last_error or None,
            "failed_version": holder.failed_version,
        }

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

    @app.post("/predict", dependencies=[Depends(authorized)])
    async def predict(request: Request) -> Any:
        model = live_model()  # read once: this request uses this model even if a swap happens meanwhile
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse(
                status_code=422,
                content={
                    "detail": [{"loc": ["body"], "msg": "body is not valid JSON", "type": "json_invalid"}]
                },
            )
        rows = body.get("rows") if isinstance(body, dict) else body
        if isinstance(rows, list) and len(rows) > MAX_ROWS:
            return JSONResponse(
                status_code=422,
                content={
                    "detail": [
                        {
                            "loc": ["body", "rows"],
                            "msg": f"at most {MAX_ROWS} rows per request; use `conveyor score` for batches",
                            "type": "too_long",
                        }
                    ]
                },
            )

        def work() -> Any:  # off the event loop: validation and prediction are CPU work
            errors = validate_rows(rows, model)
            return errors or predict_frame(model, rows_to_frame(rows, model))

        result = await run_in_threadpool(work)
        if isinstance(result, list):
            return JSONResponse(status_code=422, content={"detail": [e.detail() for e in result]})
        probabilities = result
        return {
            "model": model.model,
            "version": model.version,
            "threshold": model.threshold,
            "probabilities": probabilities.tolist(),
            "predictions": [int(p >= model.threshold) for p in probabilities],
        }

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


def uvicorn_config(app: Any, host: str, port: int, log_level: str = "warning") -> Any:
    import uvicorn

    # No websockets: the API has none, and the websockets package warns on import.
    return uvicorn.Config(
        app, host=host, port=port, log_level=log_level, ws="none", lifespan="on", access_log=False
    )


def start_in_thread(
    app: Any, host: str = "127.0.0.1", port: int = 0, ready_timeout: float = 60.0
) -> RunningServer:
    """Start uvicorn on a loopback port in a thread and wait until it accepts requests."""
    import uvicorn

    from conveyor.prefect_api import free_port

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


def serve(
    storage_url: str,
    model: str,
    alias: str = CHAMPION,
    host: str = SERVING_HOST,
    port: int = SERVING_PORT,
    poll_seconds: float = SERVING_POLL_SECONDS,
    log_level: str = "info",
) -> None:
    """Run the server in the foreground until interrupted (the ``conveyor serve`` command)."""
    import uvicorn

    from conveyor.resources import open_store

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    holder = ModelHolder(open_store(storage_url), model, alias)
    app = create_app(holder, poll_seconds)
    uvicorn.Server(uvicorn_config(app, host, port, log_level)).run()
