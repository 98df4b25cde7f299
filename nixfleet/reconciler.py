"""The reconciler: apply nixfleet.rollout's decisions to the database, one tick at a time.

A tick is ONE write transaction over every running rollout: read the facts
(set-based: one query per rollout for its deploying batch), decide (pure), write
the decision (executemany and UPDATE … FROM, never a query per machine). Because
everything a tick knows comes from the database and everything it does commits
at once, the control plane can be killed at any point and the next tick, in this
process or the next, continues exactly where the database says.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence
from datetime import datetime

from nixfleet import rollout
from nixfleet.controlplane.config import Settings
from nixfleet.models import BatchStatus, MachineHealth, RolloutStatus, isoformat, utcnow
from nixfleet.store import Store
from nixfleet.store import rollouts as store_rollouts

log = logging.getLogger("nixfleet.reconciler")

ACTOR = "reconciler"


def _facts(
    conn: sqlite3.Connection, view: rollout.RolloutView, batch: rollout.BatchView, now: datetime
) -> tuple[list[rollout.MachineFacts], dict[MachineHealth, int]]:
    """Facts of the batch's machines whose verdict may change, and counts of the rest.

    A pending machine with no report since the batch started and no soak clock
    running stays pending until the health timeout (rollout.judge's first rule), so
    before the timeout only machines with a fresh report (or soaking) are read: a
    quiet tick over 100,000 machines reads none of them. julianday() compares the
    RFC 3339 strings as times; the 1 ms margin only widens the set judge() sees.
    """
    assert batch.started_at is not None
    timed_out = (now - batch.started_at).total_seconds() >= view.spec.health_timeout
    pending = [
        store_rollouts.facts_of(r)
        for r in conn.execute(
            store_rollouts.FACTS_SQL
            + "WHERE rm.rollout_id = ? AND rm.batch_idx = ? AND rm.health = 'pending' "
            "AND (? OR rm.healthy_since IS NOT NULL "
            "OR julianday(m.last_report_at) >= julianday(?) - 1.0 / 86400000)",
            (view.id, batch.index, timed_out, isoformat(batch.started_at)),
        )
    ]
    counts = {
        MachineHealth(h): n
        for h, n in conn.execute(
            "SELECT health, COUNT(*) FROM rollout_machines WHERE rollout_id = ? AND batch_idx = ? "
            "GROUP BY health",
            (view.id, batch.index),
        )
    }
    counts[MachineHealth.PENDING] = counts.get(MachineHealth.PENDING, 0) - len(pending)
    return pending, counts


def _start_batch(
    conn: sqlite3.Connection, view: rollout.RolloutView, batch: int, now: datetime, hint: int
) -> None:
    """Record previous desired generations (first touch only), then set desired = release's."""
    at = isoformat(now)
    conn.execute(
        "UPDATE rollout_machines SET prev_generation = m.desired_generation, "
        "prev_cache_url = m.desired_cache_url, prev_source = m.desired_source, touched = 1 "
        "FROM machines m WHERE rollout_machines.rollout_id = ? AND rollout_machines.batch_idx = ? "
        "AND rollout_machines.touched = 0 AND m.id = rollout_machines.machine_id",
        (view.id, batch),
    )
    cache_url = conn.execute(
        "SELECT cache_url FROM releases WHERE id = ?", (view.spec.release,)
    ).fetchone()[0]
    conn.execute(
        "UPDATE machines SET desired_generation = rm.store_path, desired_cache_url = ?, "
        "desired_source = ?, desired_set_at = ?, poll_hint = ? FROM rollout_machines rm "
        "WHERE rm.rollout_id = ? AND rm.batch_idx = ? AND machines.id = rm.machine_id",
        (cache_url, store_rollouts.source_label(view.name), at, hint, view.id, batch),
    )
    conn.execute(
        "UPDATE rollout_batches SET started_at = ?, finished_at = NULL "
        "WHERE rollout_id = ? AND idx = ?",
        (at, view.id, batch),
    )


def _revert(conn: sqlite3.Connection, view: rollout.RolloutView, now: datetime) -> None:
    """Every touched machine back to its own previous desired generation and cache URL.

    Only where the desired generation is still the one this rollout set: an operator's
    later pin is not overwritten.
    """
    conn.execute(
        "UPDATE machines SET desired_generation = rm.prev_generation, "
        "desired_cache_url = rm.prev_cache_url, desired_source = rm.prev_source, "
        "desired_set_at = ? FROM rollout_machines rm WHERE rm.rollout_id = ? AND rm.touched = 1 "
        "AND machines.id = rm.machine_id AND machines.desired_generation IS rm.store_path "
        "AND machines.desired_source = ?",
        (isoformat(now), view.id, store_rollouts.source_label(view.name)),
    )


def apply_decision(
    conn: sqlite3.Connection,
    view: rollout.RolloutView,
    decision: rollout.Decision,
    now: datetime,
    hint: int,
) -> None:
    at = isoformat(now)
    if decision.verdicts:
        conn.executemany(
            "UPDATE rollout_machines SET health = ?, reason = ?, healthy_since = ?, "
            "decided_at = CASE WHEN ? = 'pending' THEN NULL ELSE ? END "
            "WHERE rollout_id = ? AND machine_id = ?",
            [
                (
                    v.health.value,
                    v.reason if v.health is not MachineHealth.PENDING else None,
                    isoformat(v.healthy_since),
                    v.health.value,
                    at,
                    view.id,
                    v.machine_id,
                )
                for v in decision.verdicts
            ],
        )
    for index, status in decision.batch_status.items():
        finished = at if status in (BatchStatus.SUCCEEDED, BatchStatus.FAILED) else None
        conn.execute(
            "UPDATE rollout_batches SET status = ?, finished_at = ? "
            "WHERE rollout_id = ? AND idx = ?",
            (status.value, finished, view.id, index),
        )
    if decision.start_batch is not None:
        _start_batch(conn, view, decision.start_batch, now, hint)
    if decision.revert:
        _revert(conn, view, now)
    if decision.status is not None:
        conn.execute(
            "UPDATE rollouts SET status = ?, updated_at = ? WHERE id = ?",
            (decision.status.value, at, view.id),
        )
        if decision.status is not RolloutStatus.RUNNING:
            store_rollouts.set_poll_hint(conn, view.id, None)
    if decision.events:
        store_rollouts.add_events(conn, view.id, now, decision.events, ACTOR)


def step(conn: sqlite3.Connection, rollout_id: str, now: datetime, hint: int) -> rollout.Decision:
    """Decide and apply the next step of one rollout inside the caller's transaction."""
    view = store_rollouts.load_view(conn, rollout_id)
    deploying = next((b for b in view.batches if b.status is BatchStatus.DEPLOYING), None)
    pending: Sequence[rollout.MachineFacts] = ()
    settled: dict[MachineHealth, int] = {}
    if deploying is not None:
        pending, settled = _facts(conn, view, deploying, now)
    decision = rollout.decide(view, pending, settled, now)
    apply_decision(conn, view, decision, now, hint)
    return decision


def tick(store: Store, hint: int, now: datetime | None = None) -> int:
    """One transaction over every running rollout; returns how many changed."""
    now = now or utcnow()
    changed = 0
    with store.transaction() as conn:
        running = [
            r[0]
            for r in conn.execute(
                "SELECT id FROM rollouts WHERE status = 'running' ORDER BY created_at"
            )
        ]
        for rid in running:
            decision = step(conn, rid, now, hint)
            if not decision.empty:
                changed += 1
                for e in decision.events:
                    if e.kind.startswith("rollout-") or e.kind.startswith("batch-"):
                        log.info("rollout %s: %s %s", rid, e.kind, dict(e.detail) or "")
    return changed


def job(settings: Settings, store: Store) -> None:
    """The background job (controlplane.background.JOBS)."""
    tick(store, settings.rollout_poll_hint)
