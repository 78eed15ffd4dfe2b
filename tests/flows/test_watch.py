"""The landing watcher emits an event only when the files under the URL change."""

from __future__ import annotations

from pathlib import Path


def test_watcher_reports_changes_only(prefect_api, tmp_path: Path) -> None:
    from conveyor.flows.watch import watch_source

    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "flights.csv").write_text("year\n2013\n")
    storage = (tmp_path / "store").as_uri()

    first = watch_source(landing.as_uri(), storage)
    again = watch_source(landing.as_uri(), storage)
    (landing / "weather.csv").write_text("origin\nEWR\n")
    after_new_file = watch_source(landing.as_uri(), storage)

    assert first.changed and first.files == 1
    assert not again.changed and again.fingerprint == first.fingerprint
    assert after_new_file.changed and after_new_file.files == 2
    assert len(list((tmp_path / "store" / "watch").glob("*.json"))) == 1
