"""The webhook outbox: events waiting to be sent, deliveries per URL, every attempt.

Events enter the outbox inside the transaction of the change that caused them: a
failed generation by a trigger (migration 0011); rollout events by their writers,
store.rollouts.add_events (`add`, mapped by ROLLOUT_EVENTS) and, for the machines a
tick judges unhealthy, store.verdicts.judge_batch (`add_rows`, one statement for
them all: a per-row trigger cost a tick ~150 ms per 20,000, migration 0014); and
`detect_stale` for machines that went quiet. The
sender (nixfleet.controlplane.webhooks) fans each new event out to one delivery per
subscribed URL, claims due deliveries one at a time (the claim is a lease: a sender
killed mid-attempt leaves a delivery that becomes due again) and records each
attempt. Deliveries are thus at least once; receivers deduplicate by the event id.

On PostgreSQL, where writers do not take turns: `fan_out` marks fanned out exactly the
rows it read (an outbox id below them may commit later), and it and `claim` lock the
rows they take (SKIP LOCKED: a second sender takes others); `detect_stale` holds
locks.WEBHOOK_STALE, so two runs at once cannot both announce one silence.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from nixfleet.models import isoformat, stale_cutoff
from nixfleet.settings import Webhook
from nixfleet.store import locks
from nixfleet.store.conn import Connection, Row, is_postgresql
from nixfleet.store.rows import from_row
from nixfleet.store.status import STALE_SQL  # the one SQL form of stale
from nixfleet.wire import JSONObject, WebhookEvent, WebhookRollout

FAN_OUT_BATCH = 1000
KEEP_ATTEMPTS = 20  # attempts shown per delivery (all are kept until pruned)


@dataclass(frozen=True)
class Event:
    """One outbox row; `body()` is the exact JSON that is signed and sent."""

    id: int
    event: str
    at: str
    rollout_id: str | None
    rollout_name: str | None
    machine_id: str | None
    detail: JSONObject

    def payload(self) -> WebhookEvent:
        rollout: WebhookRollout | None = (
            None if self.rollout_id is None else {"id": self.rollout_id, "name": self.rollout_name}
        )
        return {
            "id": self.id,
            "event": self.event,
            "at": self.at,
            "rollout": rollout,
            "machine": self.machine_id,
            "detail": self.detail,
        }

    def body(self) -> bytes:
        """Deterministic: every attempt of a delivery sends the same bytes."""
        return json.dumps(self.payload(), sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Claimed:
    delivery_id: int
    url: str
    attempts: int  # before this one
    expires_at: str
    event: Event


@dataclass(frozen=True)
class Attempt:
    at: str
    status: int | None
    error: str | None
    duration_ms: int


@dataclass(frozen=True)
class Delivery:
    id: int
    url: str
    state: str
    attempts: int
    created_at: str
    expires_at: str
    next_attempt_at: str | None
    last_attempt_at: str | None
    last_status: int | None
    last_error: str | None
    finished_at: str | None
    event: Event
    history: tuple[Attempt, ...]


_EVENT_SQL = (
    "SELECT o.id, o.event, o.at, o.rollout_id, r.name AS rollout_name, o.machine_id, "
    "o.detail_json FROM webhook_outbox o LEFT JOIN rollouts r ON r.id = o.rollout_id "
)


def _event(row: Row, id_column: str = "id") -> Event:
    """The outbox row's Event (`id_column`: where a join keeps the outbox id)."""
    return from_row(Event, row, id=row[id_column], detail=json.loads(row["detail_json"]))


def add(
    conn: Connection,
    event: str,
    at: datetime,
    *,
    machine_id: str | None = None,
    rollout_id: str | None = None,
    detail: JSONObject | None = None,
) -> None:
    """An event from Python code, inside the caller's transaction."""
    conn.execute(
        "INSERT INTO webhook_outbox (event, at, rollout_id, machine_id, detail_json) "
        "VALUES (?, ?, ?, ?, ?)",
        (
            event,
            isoformat(at),
            rollout_id,
            machine_id,
            json.dumps(detail or {}, sort_keys=True, default=str),
        ),
    )


MACHINE_UNHEALTHY = "machine.unhealthy"
# The rollout events (rollout_events.kind) that are webhook events, and their names.
ROLLOUT_EVENTS = {
    "rollout-created": "rollout.started",
    "rollout-paused": "rollout.paused",
    "rollout-resumed": "rollout.resumed",
    "rollout-failed": "rollout.failed",
    "rollout-completed": "rollout.completed",
    "rollout-cancelled": "rollout.cancelled",
    "batch-started": "batch.started",
    "machine-unhealthy": MACHINE_UNHEALTHY,
}


def add_rows(conn: Connection, event: str, rows: str, params: Sequence[object]) -> int:
    """An `event` for each row of the SELECT `rows`: (at, rollout_id, machine_id,
    detail_json), in the caller's transaction. Returns how many."""
    return conn.execute(
        "INSERT INTO webhook_outbox (event, at, rollout_id, machine_id, detail_json) "
        f"SELECT ?, at, rollout_id, machine_id, detail_json FROM ({rows}) AS event_rows",
        (event, *params),
    ).rowcount


def detect_stale(conn: Connection, now: datetime, stale_after: int) -> int:
    """One `machine.stale` event per machine per silence (models.is_stale, as SQL).

    webhook_stale remembers the report time each machine was announced stale at, so
    a machine that reports again and goes quiet again is announced again. Returns how
    many were announced. Decommissioned machines are never stale.
    """
    cutoff = isoformat(stale_cutoff(now, stale_after))
    quiet = (
        f"SELECT m.id, m.last_report_at FROM machines m WHERE {STALE_SQL} "
        "AND m.lifecycle != 'decommissioned' AND NOT EXISTS (SELECT 1 FROM webhook_stale s "
        "WHERE s.machine_id = m.id AND s.last_report_at = m.last_report_at)"
    )
    detail = "json_object('last_report_at', last_report_at, 'stale_after', ?)"
    if is_postgresql(conn):
        conn.execute("SELECT pg_advisory_xact_lock(?)", (locks.WEBHOOK_STALE,))
        detail = (
            "json_build_object('last_report_at', last_report_at, "
            "'stale_after', CAST(? AS INTEGER))::text"
        )
    n = conn.execute(
        "INSERT INTO webhook_outbox (event, at, machine_id, detail_json) "
        f"SELECT 'machine.stale', ?, id, {detail} FROM ({quiet}) AS q ORDER BY id",
        (isoformat(now), stale_after, cutoff),
    ).rowcount
    if n:
        conn.execute(
            "INSERT INTO webhook_stale (machine_id, last_report_at) "
            f"SELECT id, last_report_at FROM ({quiet}) AS q WHERE true "
            "ON CONFLICT (machine_id) DO UPDATE SET last_report_at = excluded.last_report_at",
            (cutoff,),
        )
    return n


def fan_out(
    conn: Connection,
    hooks: Sequence[Webhook],
    now: datetime,
    retry_for: float,
    limit: int = FAN_OUT_BATCH,
) -> int:
    """New outbox rows become one pending delivery per subscribed URL; returns rows seen.

    With no webhook subscribed to an event, the event is only marked fanned out.
    """
    pg = is_postgresql(conn)
    rows = conn.execute(
        "SELECT id, event, at FROM webhook_outbox WHERE fanned_out = 0 ORDER BY id LIMIT ?"
        + (" FOR UPDATE SKIP LOCKED" if pg else ""),
        (limit,),
    ).fetchall()
    if not rows:
        return 0
    at = isoformat(now)
    expires = isoformat(now + timedelta(seconds=retry_for))
    conn.executemany(
        "INSERT INTO webhook_deliveries (outbox_id, url, state, created_at, expires_at, "
        "next_attempt_at) VALUES (?, ?, 'pending', ?, ?, ?)",
        [
            (r["id"], hook.url, at, expires, at)
            for r in rows
            for hook in _unique(hooks)
            if hook.wants(r["event"])
        ],
    )
    if pg:  # the rows read: one of a lower id may commit after this read
        conn.execute(
            "UPDATE webhook_outbox SET fanned_out = 1 WHERE id = ANY(?)", ([r["id"] for r in rows],)
        )
    else:
        conn.execute(
            "UPDATE webhook_outbox SET fanned_out = 1 WHERE fanned_out = 0 AND id <= ?",
            (rows[-1]["id"],),
        )
    return len(rows)


def _unique(hooks: Sequence[Webhook]) -> list[Webhook]:
    """One delivery per URL: the same URL twice in the settings is one receiver."""
    seen: dict[str, Webhook] = {}
    for hook in hooks:
        seen.setdefault(hook.url, hook)
    return list(seen.values())


def claim(conn: Connection, url: str, now: datetime, lease: float) -> Claimed | None:
    """The next due delivery to `url`, leased for `lease` seconds; None when none is due."""
    row = conn.execute(
        "SELECT id, outbox_id, attempts, expires_at FROM webhook_deliveries "
        "WHERE url = ? AND state = 'pending' AND next_attempt_at <= ? "
        "ORDER BY next_attempt_at, id LIMIT 1"
        + (" FOR UPDATE SKIP LOCKED" if is_postgresql(conn) else ""),
        (url, isoformat(now)),
    ).fetchone()
    if row is None:
        return None
    conn.execute(
        "UPDATE webhook_deliveries SET next_attempt_at = ? WHERE id = ?",
        (isoformat(now + timedelta(seconds=lease)), row["id"]),
    )
    event = _event(conn.execute(_EVENT_SQL + "WHERE o.id = ?", (row["outbox_id"],)).fetchone())
    return Claimed(row["id"], url, row["attempts"], row["expires_at"], event)


def record_attempt(
    conn: Connection,
    delivery_id: int,
    now: datetime,
    status: int | None,
    error: str | None,
    duration_ms: int,
    retry_at: datetime | None,
) -> str:
    """Keep one attempt; the delivery is delivered (2xx), retried at `retry_at`, or given up.

    A failed attempt with `retry_at` None, or past the delivery's expiry, gives up.
    Returns the delivery's new state.
    """
    at = isoformat(now)
    conn.execute(
        "INSERT INTO webhook_attempts (delivery_id, at, status, error, duration_ms) "
        "VALUES (?, ?, ?, ?, ?)",
        (delivery_id, at, status, error, duration_ms),
    )
    ok = status is not None and 200 <= status < 300
    expires = conn.execute(
        "SELECT expires_at FROM webhook_deliveries WHERE id = ?", (delivery_id,)
    ).fetchone()["expires_at"]
    nxt = isoformat(retry_at) if retry_at is not None else None
    if ok:
        state = "delivered"
    elif nxt is None or nxt > expires:
        state = "failed"
    else:
        state = "pending"
    conn.execute(
        "UPDATE webhook_deliveries SET state = ?, attempts = attempts + 1, last_attempt_at = ?, "
        "last_status = ?, last_error = ?, next_attempt_at = coalesce(?, next_attempt_at), "
        "finished_at = CASE WHEN ? = 'pending' THEN NULL ELSE ? END WHERE id = ?",
        (state, at, status, error, nxt if state == "pending" else None, state, at, delivery_id),
    )
    return state


def expire(conn: Connection, now: datetime) -> int:
    """Give up pending deliveries past their expiry (e.g. to a URL no longer configured)."""
    at = isoformat(now)
    return conn.execute(
        "UPDATE webhook_deliveries SET state = 'failed', finished_at = ?, "
        "last_error = coalesce(last_error || '; ', '') || 'gave up: retried for the whole "
        "retry period' WHERE state = 'pending' AND expires_at < ?",
        (at, at),
    ).rowcount


def prune(conn: Connection, before: datetime) -> int:
    """Forget events older than `before` whose deliveries are all finished."""
    return conn.execute(
        "DELETE FROM webhook_outbox WHERE fanned_out = 1 AND at < ? AND NOT EXISTS "
        "(SELECT 1 FROM webhook_deliveries d WHERE d.outbox_id = webhook_outbox.id "
        "AND d.state = 'pending')",
        (isoformat(before),),
    ).rowcount


def deliveries(conn: Connection, *, failed: bool = False, limit: int = 100) -> list[Delivery]:
    """Newest first; `failed`: given up, or pending after a failed attempt."""
    where = (
        "WHERE d.state = 'failed' OR (d.state = 'pending' AND d.attempts > 0) " if failed else ""
    )
    rows = conn.execute(
        "SELECT d.*, o.event, o.at, o.rollout_id, r.name AS rollout_name, o.machine_id, "
        "o.detail_json FROM webhook_deliveries d JOIN webhook_outbox o ON o.id = d.outbox_id "
        f"LEFT JOIN rollouts r ON r.id = o.rollout_id {where}ORDER BY d.id DESC LIMIT ?",
        (limit,),
    ).fetchall()
    history: dict[int, list[Attempt]] = {}
    if rows:
        ids = [r["id"] for r in rows]
        marks = ",".join("?" * len(ids))
        for a in conn.execute(
            "SELECT delivery_id, at, status, error, duration_ms FROM (SELECT *, row_number() "
            "OVER (PARTITION BY delivery_id ORDER BY id DESC) AS n FROM webhook_attempts "
            f"WHERE delivery_id IN ({marks})) AS a WHERE n <= ? ORDER BY delivery_id, id",
            (*ids, KEEP_ATTEMPTS),
        ):
            history.setdefault(a["delivery_id"], []).append(from_row(Attempt, a))
    return [
        from_row(
            Delivery,
            r,
            next_attempt_at=r["next_attempt_at"] if r["state"] == "pending" else None,
            event=_event(r, "outbox_id"),
            history=tuple(history.get(r["id"], ())),
        )
        for r in rows
    ]
