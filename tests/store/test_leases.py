"""Reboot leases on both backends (`any_store`): grant rules, recursion, ownership, expiry."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from nixfleet import wire
from nixfleet.errors import ConflictError
from nixfleet.flake import release_from_document
from nixfleet.models import Lifecycle
from nixfleet.policy import fleet
from nixfleet.store import audit, leases, machines, releases
from nixfleet.store import rollouts as store_rollouts
from nixfleet.store.conn import AnyStore

T0 = datetime(2026, 12, 7, 10, 0, tzinfo=UTC)  # a Monday
FLEET = fleet.from_settings(
    reboot_groups=[{"tags": ["db"], "slots": 1}], reboot_slots=2, reboot_timeout=600
)
HOSTS = {"db-1": ["db"], "db-2": ["db"], "web-1": ["web"], "web-2": ["web"], "web-3": ["web"]}


def gen(host: str) -> str:
    return f"/nix/store/{'n' * 32}-nixos-system-{host}"


def setup(store: AnyStore, **doc: Any) -> str:
    with store.transaction() as conn:
        for h, tags in HOSTS.items():
            machines.register(conn, h, tags, Lifecycle.ACTIVE, T0)
        rel = release_from_document(
            {
                "entries": [
                    {"hostname": h, "store_path": gen(h), "platform": "x86_64-linux"} for h in HOSTS
                ]
            }
        )
        releases.insert(conn, rel, T0, "test")
        base: dict[str, Any] = {
            "version": 1,
            "name": "kernel",
            "release": rel.id,
            "target": {"hosts": sorted(HOSTS)},
            "strategy": "all-at-once",
            "reboot": "when-needed",
        }
        return store_rollouts.apply(conn, {**base, **doc}, "key:test", T0, 5).id


def take(store: AnyStore, host: str, now: datetime = T0) -> wire.RebootLeases:
    with store.transaction() as conn:
        return leases.take(conn, host, FLEET, now, f"machine:{host}")


def test_groups_have_slots_and_takes_are_recursive(any_store: AnyStore) -> None:
    store = any_store
    setup(store)
    first = take(store, "db-1")
    assert first["granted"] and [x["group"] for x in first["leases"]] == ["db"]
    assert take(store, "db-1", T0 + timedelta(seconds=30)) == first  # recursive, unchanged
    with pytest.raises(ConflictError) as e:
        take(store, "db-2")
    assert "group db is full (db-1)" in e.value.detail
    take(store, "web-1")
    take(store, "web-2")  # the default group has 2 slots
    with pytest.raises(ConflictError):
        take(store, "web-3")
    with store.transaction() as conn:
        assert leases.release(conn, "web-3", T0, "machine:web-3") == 0  # not a holder: no-op
        assert leases.release(conn, "db-1", T0, "machine:db-1") == 1
    assert take(store, "db-2")["granted"]
    with store.read() as conn:
        actions = [a.action for a in audit.query(conn)]
    assert actions.count("rollout.machine-rebooting") == 4
    assert "rollout.machine-rebooted" in actions


def test_no_lease_without_reboot_when_needed_or_outside_windows(any_store: AnyStore) -> None:
    store = any_store
    setup(
        store,
        windows=[{"days": ["tue"], "start": "09:00", "end": "16:00", "timezone": "Europe/Berlin"}],
    )
    with pytest.raises(ConflictError) as e:
        take(store, "web-1")  # Monday
    assert "outside the maintenance windows" in e.value.detail
    assert "2026-12-08T08:00:00" in e.value.detail  # Tuesday 09:00 CET
    assert take(store, "web-1", datetime(2026, 12, 8, 9, 0, tzinfo=UTC))["granted"]


def test_reboot_never_refuses(any_store: AnyStore) -> None:
    store = any_store
    setup(store, reboot="never")
    with pytest.raises(ConflictError) as e:
        take(store, "web-1")
    assert "reboot: never" in e.value.detail


def test_an_expired_lease_fails_its_machine_and_frees_the_slot(any_store: AnyStore) -> None:
    store = any_store
    rid = setup(store)
    take(store, "db-1")
    with store.transaction() as conn:
        assert leases.expire(conn, T0 + timedelta(seconds=599), "reconciler") == []
        assert leases.expire(conn, T0 + timedelta(seconds=600), "reconciler") == ["db-1"]
    with store.read() as conn:
        row = conn.execute(
            "SELECT health, reason FROM rollout_machines WHERE rollout_id = ? AND machine_id = ?",
            (rid, "db-1"),
        ).fetchone()
        kinds = [
            r[0]
            for r in conn.execute("SELECT kind FROM rollout_events WHERE rollout_id = ?", (rid,))
        ]
        hooks = conn.execute(
            "SELECT event, rollout_id, machine_id, detail_json FROM webhook_outbox "
            "WHERE event = 'machine.unhealthy'"
        ).fetchall()
    assert row[0] == "unhealthy" and "did not come back" in row[1]
    assert "reboot-lease-expired" in kinds and "machine-unhealthy" in kinds
    assert [(h[0], h[1], h[2], json.loads(h[3])) for h in hooks] == [
        ("machine.unhealthy", rid, "db-1", {"reason": row[1]})
    ]
    assert take(store, "db-2", T0 + timedelta(seconds=601))["granted"]
