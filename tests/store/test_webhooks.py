"""The webhook outbox on both backends (`any_store`): its writers, fan-out, leases, attempts."""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import replace
from datetime import timedelta

import pytest
from conftest import sql_writers

from nixfleet import rollout, schemas
from nixfleet.controlplane.webhooks import backoff, signature
from nixfleet.models import Lifecycle, Report, isoformat, utcnow
from nixfleet.settings import WEBHOOK_EVENTS, Webhook
from nixfleet.store import machines
from nixfleet.store import rollouts as store_rollouts
from nixfleet.store import webhooks as outbox
from nixfleet.store.conn import AnyStore

GEN = "/nix/store/" + "a" * 32 + "-nixos-system-web-01"
BAD = "/nix/store/" + "b" * 32 + "-nixos-system-web-01"
ROLLOUT_KINDS = {
    "rollout-created": "rollout.started",
    "rollout-paused": "rollout.paused",
    "rollout-resumed": "rollout.resumed",
    "rollout-failed": "rollout.failed",
    "rollout-completed": "rollout.completed",
    "rollout-cancelled": "rollout.cancelled",
    "batch-started": "batch.started",
    "machine-unhealthy": "machine.unhealthy",
}


def events(store: AnyStore) -> list[tuple[str, str | None, dict[str, object]]]:
    with store.read() as conn:
        rows = conn.execute(
            "SELECT event, machine_id, detail_json FROM webhook_outbox ORDER BY id"
        ).fetchall()
    return [(r[0], r[1], json.loads(r[2])) for r in rows]


def add_rollout(store: AnyStore) -> None:
    now = isoformat(utcnow())
    with store.transaction() as conn:
        conn.execute(
            "INSERT INTO releases (id, created_at, created_by) VALUES ('rel-1', ?, 't')", (now,)
        )
        conn.execute(
            "INSERT INTO rollouts (id, name, release_id, status, document_json, document_hash, "
            "source, created_at, created_by, updated_at) "
            "VALUES ('ro-1', 'web', 'rel-1', 'running', '{}', 'h', 'api', ?, 't', ?)",
            (now, now),
        )


def test_every_rollout_event_kind_becomes_its_webhook_event(any_store: AnyStore) -> None:
    store = any_store
    add_rollout(store)
    kinds = [*ROLLOUT_KINDS, "batch-succeeded", "batch-requeued", "rollout-reverted"]
    with store.transaction() as conn:
        store_rollouts.add_events(
            conn, "ro-1", utcnow(), [rollout.Event(k, 2, detail={"x": 1}) for k in kinds], "t"
        )
    got = events(store)
    assert [e[0] for e in got] == list(ROLLOUT_KINDS.values())
    assert outbox.ROLLOUT_EVENTS == ROLLOUT_KINDS
    assert set(ROLLOUT_KINDS.values()) <= set(WEBHOOK_EVENTS)
    assert all(e[2] == {"x": 1, "batch": 2} for e in got)


def test_every_writer_of_rollout_events_writes_their_webhooks() -> None:
    """No trigger (migration 0014): each writer of rollout events writes the outbox rows."""
    writers = sql_writers(r"INSERT INTO rollout_events\b")
    assert set(writers) == {
        ("nixfleet/store/rollouts.py", "add_events"),  # every kind, ROLLOUT_EVENTS
        ("nixfleet/store/verdicts.py", "judge_batch"),  # machine-unhealthy only
    }
    assert "webhooks.add" in writers[("nixfleet/store/rollouts.py", "add_events")]
    assert "webhooks.add_rows" in writers[("nixfleet/store/verdicts.py", "judge_batch")]


def test_an_event_is_written_only_with_the_change_that_caused_it(any_store: AnyStore) -> None:
    store = any_store
    add_rollout(store)
    with pytest.raises(RuntimeError), store.transaction() as conn:
        store_rollouts.add_events(conn, "ro-1", utcnow(), [rollout.Event("rollout-paused")], "t")
        raise RuntimeError("the change failed")
    assert events(store) == []


def report(success: bool, at_offset: float = 0) -> Report:
    return Report(
        machine_id="web-01",
        received_at=utcnow() + timedelta(seconds=at_offset),
        current_generation=GEN,
        success=success,
        message="rolled back: boom" if not success else "running",
        attempted_generation=None if success else BAD,
    )


def test_a_new_failed_generation_is_one_machine_failed_event(any_store: AnyStore) -> None:
    store = any_store
    with store.transaction() as conn:
        machines.register(conn, "web-01", [], Lifecycle.PENDING, utcnow())
    for r in (report(True), report(False), report(False), report(True)):
        with store.transaction() as conn:
            machines.record_report(conn, r)
    got = events(store)
    assert [(e[0], e[1]) for e in got] == [("machine.failed", "web-01")]
    assert got[0][2] == {
        "generation": BAD,
        "current_generation": GEN,
        "message": "rolled back: boom",
    }


def test_a_machine_that_first_needs_a_reboot_is_one_reboot_needed_event(
    any_store: AnyStore,
) -> None:
    store = any_store
    with store.transaction() as conn:
        machines.register(conn, "web-01", [], Lifecycle.PENDING, utcnow())
    needs = (False, True, True, False, True)  # repeats are the same need; then a new one
    for i, flag in enumerate(needs):
        r = replace(report(True, i), needs_reboot=flag, booted_generation=BAD)
        with store.transaction() as conn:
            machines.record_report(conn, r)
    got = events(store)
    assert [(e[0], e[1]) for e in got] == [("machine.reboot-needed", "web-01")] * 2
    assert got[0][2] == {"generation": GEN, "booted_generation": BAD}


def test_fan_out_claim_and_attempts(any_store: AnyStore) -> None:
    store = any_store
    now = utcnow()
    hooks = [
        Webhook("http://127.0.0.1:1/a", "/s", ("machine.failed",)),
        Webhook("http://127.0.0.1:1/b", "/s", ("rollout.started",)),
        Webhook("http://127.0.0.1:1/a", "/other", ("*",)),  # same URL again: one receiver
    ]
    with store.transaction() as conn:
        outbox.add(conn, "machine.failed", now, machine_id="web-01", detail={"m": "x"})
        assert outbox.fan_out(conn, hooks, now, 60) == 1
        assert outbox.fan_out(conn, hooks, now, 60) == 0
        claimed = outbox.claim(conn, hooks[0].url, now, lease=5)
        assert claimed is not None and claimed.attempts == 0
        assert outbox.claim(conn, hooks[0].url, now, lease=5) is None, "leased"
        assert outbox.claim(conn, hooks[1].url, now, lease=5) is None, "not subscribed"
        assert outbox.claim(conn, hooks[0].url, now + timedelta(seconds=6), 5) is not None
        schemas.validate("webhook-event", json.loads(claimed.event.body()))
        state = outbox.record_attempt(
            conn, claimed.delivery_id, now, 500, "HTTP 500", 3, now + timedelta(seconds=1)
        )
        assert state == "pending"
        state = outbox.record_attempt(
            conn, claimed.delivery_id, now, None, "refused", 1, now + timedelta(seconds=61)
        )
        assert state == "failed", "a retry past the expiry gives up"
    with store.read() as conn:
        (d,) = outbox.deliveries(conn, failed=True)
    assert d.state == "failed" and d.attempts == 2 and d.next_attempt_at is None
    assert [a.status for a in d.history] == [500, None]


def test_stale_machines_are_announced_once_per_silence(any_store: AnyStore) -> None:
    store = any_store
    now = utcnow()
    with store.transaction() as conn:
        machines.register(conn, "web-01", [], Lifecycle.PENDING, now)
        machines.register(conn, "web-02", [], Lifecycle.PENDING, now)  # never reported
        silent = report(True, at_offset=-100)
        machines.record_report(conn, silent)
    with store.transaction() as conn:
        assert outbox.detect_stale(conn, now, 60) == 1
        assert outbox.detect_stale(conn, now, 60) == 0
        machines.record_report(conn, report(True, at_offset=-90))
        assert outbox.detect_stale(conn, now, 60) == 1
        machines.set_lifecycle(conn, "web-01", Lifecycle.DECOMMISSIONED)
        conn.execute("DELETE FROM webhook_stale")
        assert outbox.detect_stale(conn, now, 60) == 0, "decommissioned: never stale"
    got = events(store)
    assert [e[1] for e in got] == ["web-01", "web-01"]
    first = isoformat(silent.received_at)[:19]
    assert got[0][0] == "machine.stale" and got[0][2]["stale_after"] == 60
    assert str(got[0][2]["last_report_at"]).startswith(first)


def test_each_row_of_a_select_is_one_event(any_store: AnyStore) -> None:
    """add_rows: what the tick writes for the machines it judged unhealthy."""
    store = any_store
    add_rollout(store)
    now = utcnow()
    with store.transaction() as conn:
        for m in ("web-02", "web-01", "db-01"):
            machines.register(conn, m, [], Lifecycle.ACTIVE, now)
        n = outbox.add_rows(
            conn,
            outbox.MACHINE_UNHEALTHY,
            "SELECT ? AS at, ? AS rollout_id, id AS machine_id, '{\"batch\": 1}' AS detail_json "
            "FROM machines WHERE id LIKE ? ORDER BY id",
            (isoformat(now), "ro-1", "web-%"),
        )
        assert n == 2
        claimed = [outbox.fan_out(conn, [Webhook("http://127.0.0.1:1/a", "/s", ("*",))], now, 60)]
        ev = outbox.claim(conn, "http://127.0.0.1:1/a", now, lease=5)
    assert events(store) == [
        ("machine.unhealthy", "web-01", {"batch": 1}),
        ("machine.unhealthy", "web-02", {"batch": 1}),
    ]
    assert claimed == [2] and ev is not None
    assert ev.event.payload()["rollout"] == {"id": "ro-1", "name": "web"}
    assert ev.event.at == isoformat(now) and ev.event.machine_id == "web-01"


def test_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    body = b'{"event":"rollout.started"}'
    expected = hmac.new(b"k", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert signature(b"k", "1700000000", body) == "sha256=" + expected


@pytest.mark.parametrize(
    ("attempts", "low", "high"), [(1, 9, 11), (2, 18, 22), (9, 540, 660), (60, 540, 660)]
)
def test_backoff_doubles_and_is_capped(attempts: int, low: float, high: float) -> None:
    assert low <= backoff(attempts, 10, 600) <= high
