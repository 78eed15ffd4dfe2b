"""conveyor.quiet: a user error is one line without a traceback, a bug keeps its traceback, chatter goes."""

from __future__ import annotations

import logging

import pytest
from pydantic import BaseModel, Field, ValidationError

from conveyor import quiet
from conveyor.errors import InputError, SpecError


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def captured(monkeypatch):
    monkeypatch.delenv(quiet.DEBUG_ENV, raising=False)
    quiet.install()
    handler = _Capture()
    names = ("prefect.task_runs", "prefect.flow_runs", "distributed.nanny")
    # Only our handler sees the records: once Prefect has configured logging (any test that ran a flow),
    # its API handler on these loggers warns about records logged outside a flow run.
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate) for n in names}
    for name in names:
        logger = logging.getLogger(name)
        logger.handlers, logger.propagate = [handler], False
    yield handler
    for name, (handlers, propagate) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers, logger.propagate = handlers, propagate


def _log_failure(logger: str, exc: BaseException) -> None:
    try:
        raise exc
    except BaseException:
        logging.getLogger(logger).error("failed with %r", exc, exc_info=True)


def test_a_user_error_is_logged_once_without_its_traceback(captured) -> None:
    exc = InputError("flights.csv", "carrier", "required column is missing")
    _log_failure("prefect.task_runs", exc)
    _log_failure("prefect.flow_runs", exc)  # the flow engine logs the same exception again
    assert len(captured.records) == 1 and captured.records[0].exc_info is None
    assert "carrier" in captured.records[0].getMessage()


def test_a_bug_keeps_its_traceback(captured) -> None:
    _log_failure("prefect.flow_runs", KeyError("boom"))
    assert captured.records[0].exc_info is not None


def test_the_nanny_kill_at_shutdown_is_dropped_and_other_nanny_warnings_stay(captured) -> None:
    nanny = logging.getLogger("distributed.nanny")
    nanny.warning("Worker process still alive after 4.0 seconds, killing")
    nanny.warning("Restarting worker")
    assert [r.getMessage() for r in captured.records] == ["Restarting worker"]


def test_report_prints_one_line_with_a_hint_for_user_errors(capsys) -> None:
    class P(BaseModel):
        max_rows: int = Field(ge=1000)

    with pytest.raises(ValidationError) as bad:
        P(max_rows=10)
    assert quiet.report(bad.value) == 2
    assert quiet.report(SpecError("x.yaml", "label", "missing")) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all("hint:" in line and "Traceback" not in line for line in lines)
    assert lines[0].startswith("conveyor: error: invalid parameters: max_rows:")


def test_report_prints_the_traceback_of_a_bug(capsys) -> None:
    try:
        raise KeyError("boom")
    except KeyError as exc:
        assert quiet.report(exc) == 1
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("quieted", [True, False])
def test_xgboost_rank_lines_are_dropped_on_the_workers(quieted, monkeypatch, capfd) -> None:
    """A cluster of its own, started under capfd: its worker processes write to the captured stderr."""
    import dask.dataframe as dd
    import numpy as np
    import pandas as pd
    import xgboost.dask as dxgb
    from distributed import Client, LocalCluster

    if not quieted:
        monkeypatch.setenv(quiet.DEBUG_ENV, "1")
    frame = pd.DataFrame({"a": np.random.default_rng(0).random(400)})
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0")
    with cluster, Client(cluster) as client:
        quiet.quiet_workers(client)
        X = dd.from_pandas(frame, npartitions=2).persist()
        y = dd.from_pandas((frame.a > 0.5).astype(int), npartitions=2).persist()
        dxgb.train(client, {"objective": "binary:logistic"}, dxgb.DaskDMatrix(client, X, y), 2)
    out, err = capfd.readouterr()
    assert ("got rank" in out + err) is not quieted
