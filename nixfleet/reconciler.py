"""The reconciler: apply nixfleet.rollout's decisions to the database, one tick at a time.

A tick is ONE write transaction over every running rollout: judge the deploying
batch (set-based in SQL, store.verdicts.judge_batch, the twin of the pure
rollout.judge), decide what follows from its tally (rollout.advance, pure), and
write the decision with a few statements per batch, never one per machine.
Because everything a tick knows comes from the database and everything it does
commits at once, the control plane can be killed at any point and the next tick,
in this process or the next, continues exactly where the database says.
"""

from __future__ import annotations

import logging
import sqlite3
from datetime import datetime

from nixfleet import rollout
from nixfleet.controlplane.config import Settings
from nixfleet.models import BatchStatus, MachineHealth, RolloutStatus, isoformat, utcnow
from nixfleet.store import Store, verdicts
from nixfleet.store import rollouts as store_rollouts

log = logging.getLogger("nixfleet.reconciler")

ACTOR = "reconciler"


def _start_batch(
    conn: sqlite3.Connection, view: rollout.RolloutView, batch: int, now: datetime, hint: int
) -> None:
    """Set desired = the release's generation for the batch's machines.

    Each machine's previous desired generation is recorded at its batch's first
    start only (a requeued batch keeps the first record). `apply` already copied
    it into rollout_machines.prev_*, so here only machines whose desired
    generation changed since then are written: usually none, instead of 100,000
    rows (and their WAL pages) per batch.
    """
    at = isoformat(now)
    if view.batches[batch].started_at is None:
        conn.execute(
            "UPDATE rollout_machines SET prev_generation = m.desired_generation, "
            "prev_cache_url = m.desired_cache_url, prev_source = m.desired_source "
            "FROM machines m WHERE rollout_machines.rollout_id = ? "
            "AND rollout_machines.batch_idx = ? AND m.id = rollout_machines.machine_id "
            "AND (m.desired_generation IS NOT rollout_machines.prev_generation "
            "OR m.desired_cache_url IS NOT rollout_machines.prev_cache_url "
            "OR m.desired_source IS NOT rollout_machines.prev_source)",
            (view.id, batch),
        )
    cache_url = conn.execute(
        "SELECT cache_url FROM releases WHERE id = ?", (view.spec.release,)
    ).fetchone()[0]
    # IN + a correlated look-up, not UPDATE … FROM: ~30% faster here, as FROM
    # materialises the join before updating.
    conn.execute(
        "UPDATE machines SET desired_generation = (SELECT rm.store_path FROM rollout_machines rm "
        "WHERE rm.rollout_id = ? AND rm.machine_id = machines.id), desired_cache_url = ?, "
        "desired_source = ?, desired_set_at = ? WHERE id IN "
        "(SELECT machine_id FROM rollout_machines WHERE rollout_id = ? AND batch_idx = ?)",
        (view.id, cache_url, store_rollouts.source_label(view.name), at, view.id, batch),
    )
    store_rollouts.set_poll_hint(conn, view.id, hint)  # one row: the report path reads it
    conn.execute(
        "UPDATE rollout_batches SET started_at = ?, finished_at = NULL "
        "WHERE rollout_id = ? AND idx = ?",
        (at, view.id, batch),
    )


def _revert(conn: sqlite3.Connection, view: rollout.RolloutView, now: datetime) -> None:
    """Every touched machine back to its own previous desired generation and cache URL.

    Touched = in a batch that has started (started_at is never cleared). Only where
    the desired generation is still the one this rollout set: an operator's later
    pin is not overwritten.
    """
    conn.execute(
        "UPDATE machines SET desired_generation = rm.prev_generation, "
        "desired_cache_url = rm.prev_cache_url, desired_source = rm.prev_source, "
        "desired_set_at = ? FROM rollout_machines rm WHERE rm.rollout_id = ? "
        "AND rm.batch_idx IN (SELECT idx FROM rollout_batches WHERE rollout_id = ? "
        "AND started_at IS NOT NULL) "
        "AND machines.id = rm.machine_id AND machines.desired_generation IS rm.store_path "
        "AND machines.desired_source = ?",
        (isoformat(now), view.id, view.id, store_rollouts.source_label(view.name)),
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
    """Decide and apply the next step of one rollout inside the caller's transaction.

    The deploying batch is judged set-based in SQL (store.verdicts.judge_batch, the
    twin of rollout.judge); what follows from its tally is rollout.advance, pure.
    """
    view = store_rollouts.load_view(conn, rollout_id)
    if view.status is not RolloutStatus.RUNNING:
        return rollout.Decision()
    deploying = rollout.deploying_batch(view)
    judged, tally = 0, None
    if deploying is not None:
        judged, tally = verdicts.judge_batch(conn, view, deploying, now, ACTOR)
    decision = rollout.advance(view, tally)
    decision.judged = judged
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
