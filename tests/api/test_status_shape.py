"""A machine's status entry is built once: api.machines.status_json is the definition,
and the SQL that writes the whole fleet's entries (store.status.STATUS_SQL) gives the
same keys and values for every machine of a generated fleet, on each backend
(`any_store`: SQLite's json_object and PostgreSQL's row_to_json)."""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime, timedelta

from nixfleet.api.machines import machine_json, status_json
from nixfleet.filters import MachineFilter
from nixfleet.models import Lifecycle, isoformat
from nixfleet.store import machines, status
from nixfleet.store.conn import AnyStore

NOW = datetime(2026, 11, 27, 10, 0, 0, 250_000, tzinfo=UTC)
STALE_AFTER = 300
A, B = "/nix/store/" + "a" * 32 + "-a", "/nix/store/" + "b" * 32 + "-b"
GENERATIONS = (None, A, B)
REPORTS = (None, NOW - timedelta(seconds=10), NOW - timedelta(seconds=STALE_AFTER, microseconds=1))


def test_status_entries_are_status_json_machine_by_machine(any_store: AnyStore) -> None:
    store = any_store
    cases = list(
        itertools.product(GENERATIONS, GENERATIONS, GENERATIONS, REPORTS, (None, "rolled back"))
    )
    lifecycles = list(Lifecycle)
    with store.transaction() as conn:
        for i, (desired, current, failed, report, message) in enumerate(cases):
            mid = f"m{i:03}"
            tags = [f"t{i % 3}", "all"][: 1 + i % 2]
            machines.register(conn, mid, tags, lifecycles[i % len(lifecycles)], NOW)
            if i % 4 == 0:
                machines.set_tags(conn, mid, ["agent-tag", "all"], "agent", replace=True)
            conn.execute(
                "UPDATE machines SET desired_generation = ?, current_generation = ?, "
                "failed_generation = ?, last_report_at = ?, last_message = ?, "
                "system_state = ?, needs_reboot = ? WHERE id = ?",
                (
                    desired,
                    current,
                    failed,
                    isoformat(report),
                    message,
                    ("ok", "degraded", "error", "unknown")[i % 4],
                    (None, 0, 1)[i % 3],
                    mid,
                ),
            )
    with store.read() as conn:
        doc = status.status_document(conn, MachineFilter(), NOW, STALE_AFTER)
        fleet = machines.list_machines(conn)
    entries = json.loads(b"[" + doc.machines_json + b"]")
    assert len(entries) == len(fleet) == len(cases)
    for entry, m in zip(entries, fleet, strict=True):
        want = status_json(m, NOW, STALE_AFTER)
        assert list(entry) == list(want) == list(status.STATUS_SQL)
        assert entry == want
        full: dict[str, object] = dict(machine_json(m, NOW, STALE_AFTER))
        assert {k: full[k] for k in want} == want
    assert {e["stale"] for e in entries} == {True, False}
    assert len({e["sync"] for e in entries}) == 4
    assert {e["needs_reboot"] for e in entries} == {None, False, True}
