"""A fresh Prefect home starts from a migrated template, its block types registered, instead of running
every migration and registering every block type."""

from __future__ import annotations

import json
import sqlite3
import urllib.request

import pytest

from conveyor import prefect_api
from conveyor.prefect_api import _seed_database, build_template, free_port, start_server


@pytest.fixture
def template(tmp_path, monkeypatch):
    path = tmp_path / "share" / "prefect-test.db"
    monkeypatch.setattr(prefect_api, "template_db", lambda: path)
    for name in ("PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL"):
        monkeypatch.delenv(name, raising=False)
    return path


def test_a_fresh_home_gets_the_template_and_a_used_one_keeps_its_history(tmp_path, template, monkeypatch):
    template.parent.mkdir(parents=True)
    template.write_bytes(b"migrated")
    fresh, used = tmp_path / "fresh", tmp_path / "used"
    fresh.mkdir()
    used.mkdir()
    (used / "prefect.db").write_bytes(b"history")
    _seed_database(fresh)
    _seed_database(used)
    assert (fresh / "prefect.db").read_bytes() == b"migrated"
    assert (used / "prefect.db").read_bytes() == b"history"
    assert [p.name for p in fresh.iterdir()] == ["prefect.db"]  # no partial copy left behind
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", "postgresql+asyncpg://db/prefect")
    _seed_database(elsewhere)  # the operator's database: nothing to seed
    assert not (elsewhere / "prefect.db").exists()


def test_no_template_means_the_server_migrates_as_before(tmp_path, template):
    home = tmp_path / "home"
    home.mkdir()
    _seed_database(home)
    assert not (home / "prefect.db").exists()


@pytest.mark.e2e
def test_a_server_starts_on_the_built_template_and_records_runs(tmp_path, template):
    build_template()
    with sqlite3.connect(template) as db:
        (head,) = db.execute("select version_num from alembic_version").fetchone()
    assert head
    home = tmp_path / "home"
    api = start_server(home, free_port(), home / "server.log")
    try:
        with sqlite3.connect(home / "prefect.db") as db:
            assert db.execute("select version_num from alembic_version").fetchone() == (head,)
        request = urllib.request.Request(
            f"{api.url}/flows/",
            data=json.dumps({"name": "template-check"}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as resp:
            assert resp.status in (200, 201)
        # The block types come with the template (a seeded home's first start skips registering them):
        # the UI's block catalog is whole.
        request = urllib.request.Request(
            f"{api.url}/block_types/filter", data=b"{}", headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as resp:
            slugs = {b["slug"] for b in json.load(resp)}
        assert {"secret", "webhook", "slack-webhook", "local-file-system", "s3-bucket"} <= slugs
        with sqlite3.connect(template) as db:
            assert db.execute("select count(*) from block_type").fetchone() == (len(slugs),)
    finally:
        api.stop()
