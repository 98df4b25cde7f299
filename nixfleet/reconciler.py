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
from nixfleet.models import RolloutStatus, utcnow
from nixfleet.settings import Settings
from nixfleet.store import Store, ticks, verdicts
from nixfleet.store import rollouts as store_rollouts

log = logging.getLogger("nixfleet.reconciler")

ACTOR = "reconciler"
# Machines a tick writes or judges per rollout: keeps a tick (and the write lock it
# holds, which reports wait for) around 100 ms at any fleet size; docs/performance.md.
TICK_MACHINES = 20_000


def apply_decision(
    conn: sqlite3.Connection,
    view: rollout.RolloutView,
    decision: rollout.Decision,
    now: datetime,
    hint: int,
    budget: int = 0,
) -> None:
    """Write a decision; a batch it starts gets up to `budget` desired generations now."""
    for index, status in decision.batch_status.items():
        ticks.set_batch_status(conn, view.id, index, status, now)
    if decision.start_batch is not None:
        ticks.start_batch(conn, view, decision.start_batch, now, hint, budget)
    if decision.revert:
        ticks.revert(conn, view.id, view.name, -1, budget, now)
    if decision.status is not None:
        ticks.set_rollout_status(conn, view.id, decision.status, now)
        if decision.status is not RolloutStatus.RUNNING:
            store_rollouts.set_poll_hint(conn, view.id, None)
    if decision.events:
        store_rollouts.add_events(conn, view.id, now, decision.events, ACTOR)


def step(
    conn: sqlite3.Connection,
    rollout_id: str,
    now: datetime,
    hint: int,
    limit: int = TICK_MACHINES,
) -> rollout.Decision:
    """Decide and apply the next step of one rollout inside the caller's transaction.

    At most `limit` machines are written or judged: a deploying batch whose desired
    generations are not all written gets the next `limit` of them and nothing
    else; otherwise the next window of `limit` positions is judged (set-based in
    SQL, store.verdicts.judge_batch, the twin of rollout.judge), and what follows
    from the whole batch's tally is rollout.advance, pure. A batch of N machines
    thus starts in ceil(N / limit) ticks, and each machine is judged at least every
    ceil(N / limit) ticks.
    """
    view = store_rollouts.load_view(conn, rollout_id)
    if view.status is not RolloutStatus.RUNNING:
        return rollout.Decision()
    deploying = rollout.deploying_batch(view)
    judged, tally, budget = 0, None, limit
    if deploying is not None:
        first, last = rollout.batch_positions(view, deploying.index)
        progress = ticks.batch_progress(conn, view.id, deploying.index, first)
        started, cursor = progress.started_until, progress.judged_until
        if started < last:
            until = min(last, started + limit)
            ticks.write_desired(conn, view, deploying.index, started, until, now)
            return rollout.Decision(written=until - started)
        after = first - 1 if cursor is None else cursor
        until = min(last, after + limit)
        judged, tally = verdicts.judge_batch(conn, view, deploying, now, ACTOR, (after, until))
        budget -= until - after
        next_cursor = until if until < last else None  # the window after the last: the first
        if next_cursor != cursor:
            ticks.set_judged_until(conn, view.id, deploying.index, next_cursor)
    decision = rollout.advance(view, tally)
    decision.judged = judged
    apply_decision(conn, view, decision, now, hint, budget)
    return decision


def tick(store: Store, hint: int, now: datetime | None = None, limit: int = TICK_MACHINES) -> int:
    """One transaction over every running rollout; returns how many changed."""
    now = now or utcnow()
    changed = 0
    with store.transaction() as conn:
        for r in ticks.to_visit(conn):
            if r.revert_after is not None:  # a revert larger than one tick, continued
                ticks.revert(conn, r.id, r.name, r.revert_after, limit, now)
                changed += 1
            if r.status is not RolloutStatus.RUNNING:
                continue
            decision = step(conn, r.id, now, hint, limit)
            if not decision.empty:
                changed += 1
                for e in decision.events:
                    if e.kind.startswith("rollout-") or e.kind.startswith("batch-"):
                        log.info("rollout %s: %s %s", r.id, e.kind, dict(e.detail) or "")
    return changed


def job(settings: Settings, store: Store) -> None:
    """The background job (controlplane.background.JOBS)."""
    tick(store, settings.rollout_poll_hint)
