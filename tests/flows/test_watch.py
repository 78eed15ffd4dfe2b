"""The landing watcher emits ``conveyor.dataset.landed`` only when the files under the URL change, and the
event reaches the Prefect API in the shape the on-new-data trigger expects."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.support import REPO_ROOT, allow_roots, wait_for


def _landed_events(source_url: str, count: int) -> list:
    """The landed events the API holds for ``source_url``, once it holds ``count`` of them (oldest first).

    Events travel through this process's events worker and the server's event pipeline: drained, then
    polled.
    """
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventOrder, EventResourceFilter

    from conveyor.flows.watch import LANDED
    from conveyor.prefect_api import drain_prefect

    drain_prefect()
    wanted = EventFilter(
        event=EventNameFilter(name=[LANDED]),
        resource=EventResourceFilter(id=[source_url]),
        order=EventOrder.ASC,
    )

    def read() -> list:
        with get_client(sync_client=True) as client:
            events = client.read_events(filter=wanted, limit=50).events
        return events if len(events) >= count else []

    events = wait_for(read, f"{count} {LANDED} events for {source_url} in the Prefect API")
    return events


def test_watcher_emits_landed_events_only_for_changes(prefect_api, tmp_path: Path, monkeypatch) -> None:
    from conveyor.flows.watch import LANDED, watch_source

    allow_roots(monkeypatch, tmp_path)

    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "flights.csv").write_text("year\n2013\n")
    storage = (tmp_path / "store").as_uri()
    source = landing.as_uri()

    first = watch_source(source, storage)
    [event] = _landed_events(source, 1)
    assert event.event == LANDED and event.resource["conveyor.fingerprint"] == first.fingerprint
    assert event.payload == {"files": 1, "previous": None}

    again = watch_source(source, storage)
    (landing / "weather.csv").write_text("origin\nEWR\n")
    after_new_file = watch_source(source, storage)
    events = _landed_events(source, 2)

    assert first.changed and first.files == 1
    assert not again.changed and again.fingerprint == first.fingerprint
    assert after_new_file.changed and after_new_file.files == 2
    # One event per change, none for the unchanged run; each names the fingerprint it saw.
    assert [e.resource["conveyor.fingerprint"] for e in events] == [
        first.fingerprint,
        after_new_file.fingerprint,
    ]
    assert events[1].payload == {"files": 2, "previous": first.fingerprint}
    assert len(list((tmp_path / "store" / "watch").glob("*.json"))) == 1

    # The on-new-data deployment's trigger matches this event and takes the source URL from it.
    deployments = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())["deployments"]
    trigger = next(d for d in deployments if d["name"] == "on-new-data")["triggers"][0]
    assert event.event in trigger["expect"] and event.resource.id == source
    assert trigger["parameters"]["params"]["source_url"] == "{{ event.resource.id }}"
