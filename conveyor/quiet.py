"""Quiet, honest output: a user's mistake is one line and a hint; library chatter stays out of a run.

What reaches a run's output, and why each filter is narrow:

- A **user error** (:data:`USER_ERRORS`: bad input, a bad spec, bad parameters, a
  request the operator settings refuse) is told once, as :func:`one_line` plus
  :func:`hint`. Prefect's engines log a failed task and flow with the exception's
  traceback; :func:`install` drops the traceback of those records for user errors
  only (their message already names the file and field). A real bug keeps it.
- **XGBoost** prints ``Task [xgboost.dask-N]:tcp://... got rank N`` for every
  worker joining a training: ``LOG(CONSOLE)``, which no ``verbosity`` silences,
  through a log callback that is thread-local in libxgboost. Dask's executor
  threads never registered one, so the line goes straight to the worker's
  stderr. :func:`quiet_workers` adds a worker plugin that registers a filtering
  callback in the thread that joins the collective (``xgboost.collective.init``).
- **distributed** logs ``Worker process still alive after 4.0 seconds, killing``
  when a local cluster closes and a worker process is slow to exit (the nanny
  then kills it: the expected end of a run), and P2P shuffles log every start
  and stop at WARNING. Those two, and only those, are dropped.

``CONVEYOR_DEBUG=1`` (the CLI's ``--debug``) turns all of it off. Imports no
Prefect at module level: Dask workers import this module for the plugin.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import re
import sys
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin
from pydantic import ValidationError

from conveyor.errors import InputError, SpecError
from conveyor.operator import OperatorError
from conveyor.store.registry import AliasConflict, RegistryError

DEBUG_ENV = "CONVEYOR_DEBUG"
USER_ERRORS: tuple[type[BaseException], ...] = (
    InputError,
    SpecError,
    OperatorError,
    ValidationError,
    RegistryError,
    AliasConflict,
)
# The engines' loggers that log a failed run with its traceback.
RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs")
RANK_LINE = re.compile(r"\bgot rank \d+")
NANNY_KILL = "Worker process still alive after"
PLUGIN_NAME = "conveyor-quiet"

logger = logging.getLogger(__name__)


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def user_error(exc: BaseException | None) -> BaseException | None:
    """The user error ``exc`` is, or was raised ``from`` (a library may wrap ours); None for anything else.

    Only explicit causes count: a bug raised while handling a user error is still a bug.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, USER_ERRORS):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__
    return None


def one_line(exc: BaseException) -> str:
    """The error as one line: ``InputError: <file>: field '<f>': <problem>``, parameters by field path."""
    if isinstance(exc, ValidationError):
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or exc.title}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors(include_url=False)
        )
        return f"invalid parameters: {problems}"
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def hint(exc: BaseException) -> str:
    """What to do about a user error, in one line."""
    if isinstance(exc, SpecError):
        return "check a spec without reading any data with `conveyor check-spec SPEC`"
    if isinstance(exc, InputError):
        return "fix the file or column named above, or point --source-url at data with the spec's columns"
    if isinstance(exc, OperatorError):
        return "the operator's settings (CONVEYOR_ALLOWED_*, CONVEYOR_MAX_*) decide what a run may name"
    return "--help lists the options; --params-json takes the run form's fields (flows/params.py)"


class _UserErrorsWithoutTraceback(logging.Filter):
    """A user error's record keeps its one line and loses its traceback; told once, not per layer.

    The task engine logs the failed stage; the flow engine then logs the same exception again, which is
    dropped (a user error raised in the flow itself is still logged there, once).
    """

    def __init__(self, told: list[BaseException]):
        super().__init__()
        self.told = told  # user errors already logged, newest last (a few: a run fails once)

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if user_error(exc) is None:
            return True
        record.exc_info = None
        record.exc_text = None
        if any(e is exc for e in self.told):
            return False
        self.told[:] = [*self.told[-7:], exc]
        return True


def mark_logged(exc: BaseException) -> None:
    """``exc`` came out of a flow run: Prefect's engine has logged it (with its traceback, if a bug)."""
    exc._conveyor_logged = True  # type: ignore[attr-defined]


def report(exc: BaseException, prog: str = "conveyor") -> int:
    """Tell a command-line user about ``exc`` on stderr; the exit code.

    A user error: one line ending in a hint (2 for bad parameters, else 1). Anything else
    is a bug or trouble in the environment: its traceback (unless a flow run's log
    already showed it) and the same one line.
    """
    import traceback

    problem = user_error(exc)
    if problem is not None:
        print(f"{prog}: error: {one_line(problem)} (hint: {hint(problem)})", file=sys.stderr)
        return 2 if isinstance(problem, ValidationError) else 1
    if not getattr(exc, "_conveyor_logged", False):
        traceback.print_exception(exc)
    print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
    return 1


class _DropMessages(logging.Filter):
    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


_INSTALLED = False


def install() -> None:
    """Logging filters of this process (idempotent; nothing with ``CONVEYOR_DEBUG`` set)."""
    global _INSTALLED
    if _INSTALLED or debugging():
        return
    _INSTALLED = True
    told: list[BaseException] = []
    for name in RUN_LOGGERS:
        logging.getLogger(name).addFilter(_UserErrorsWithoutTraceback(told))
    logging.getLogger("distributed.nanny").addFilter(_DropMessages(NANNY_KILL))
    # Every P2P shuffle's start and stop, at WARNING: progress, not a problem.
    logging.getLogger("distributed.shuffle._scheduler_plugin").setLevel(logging.ERROR)


# --- XGBoost's rank lines, on the Dask workers -----------------------------------------------------------

_CALLBACK: Any = None


def _register_log_filter() -> None:
    """Route libxgboost's log of the calling thread through a callback that drops the rank lines."""
    global _CALLBACK
    from xgboost import core  # its library handle: the callback registry is only in the C API

    if _CALLBACK is None:

        def log(message: bytes) -> None:
            text = message.decode(errors="replace")
            if not RANK_LINE.search(text):
                sys.stderr.write(text + "\n")  # where libxgboost's default callback writes

        _CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_char_p)(log)
    core._LIB.XGBRegisterLogCallback(_CALLBACK)


def silence_rank_lines() -> None:
    """In this process, register the filtering callback in whichever thread joins an XGBoost collective."""
    from xgboost import collective

    if getattr(collective.init, "_conveyor_quiet", False):
        return
    original = collective.init

    @functools.wraps(original)
    def init(**args: Any) -> None:
        _register_log_filter()
        original(**args)

    init._conveyor_quiet = True  # type: ignore[attr-defined]
    collective.init = init


class QuietWorker(WorkerPlugin):
    """:func:`silence_rank_lines` in every worker of a cluster, restarted ones included."""

    name = PLUGIN_NAME

    def setup(self, worker: Any) -> None:
        silence_rank_lines()


def quiet_workers(client: Any) -> None:
    """Install :class:`QuietWorker` on the cluster of ``client`` (idempotent); never fails a stage."""
    if debugging():
        return
    try:
        client.register_plugin(QuietWorker(), name=PLUGIN_NAME)
    except Exception as exc:  # noise control is not worth a failed stage
        logger.debug("could not install %s on the workers: %s", PLUGIN_NAME, exc)
