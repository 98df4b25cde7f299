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
from dataclasses import dataclass, field
from datetime import datetime

from nixfleet import rollout
from nixfleet.models import RolloutStatus, utcnow
from nixfleet.policy import budgets, gate
from nixfleet.policy.fleet import FleetPolicy
from nixfleet.settings import Settings
from nixfleet.store import leases, ticks, verdicts
from nixfleet.store import policy as store_policy
from nixfleet.store import rollouts as store_rollouts
from nixfleet.store.conn import AnyStore, Connection

log = logging.getLogger("nixfleet.reconciler")

ACTOR = "reconciler"
# Machines a tick writes or judges per rollout: keeps a tick (and the write lock it
# holds, which reports wait for) under the 250 ms budget at any fleet size (a machine
# written costs ~15 µs of CPU with its history event, one judged ~10 µs);
# docs/performance.md.
TICK_MACHINES = 5_000
# A rollout under a budget (max_unavailable, or the fleet's disruption budgets) also
# counts the unavailable machines in its tick (store.policy.collect and its counts:
# ~75 ms of CPU at 100,000 machines with 10,000 in flight), so its tick writes and
# judges this share of TICK_MACHINES; docs/performance.md, "Session 6".
LIMITED_SHARE = 0.5


def limited_share(limit: int) -> int:
    """The machines a rollout under a budget writes or judges per tick (LIMITED_SHARE)."""
    return max(1, int(limit * LIMITED_SHARE))


def apply_decision(
    conn: Connection,
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


@dataclass
class PolicyTick:
    """What one tick knows of the §11 policy: the fleet settings and the windows' clock.

    The unavailable machines are collected once per tick, when a batch first needs
    them (store.policy.collect), and updated as the tick starts machines.
    """

    fleet: FleetPolicy = field(default_factory=FleetPolicy)
    stale_after: int = 300
    window_now: datetime | None = None  # None: the tick's own time
    collected: bool = False

    def limited(self, view: rollout.RolloutView) -> bool:
        return view.policy.max_unavailable is not None or bool(self.fleet.budgets)


def _admit(
    conn: Connection,
    view: rollout.RolloutView,
    batch: int,
    after: int,
    until: int,
    now: datetime,
    ctx: PolicyTick,
) -> tuple[int, gate.Hold | None]:
    """How many of positions (after, until] start now under the budgets (budgets.admit)."""
    if not ctx.collected:
        store_policy.collect(conn, now, ctx.stale_after)
        ctx.collected = True
    limit = view.policy.max_unavailable
    targets = sum(b.size for b in view.batches)
    down = store_policy.unavailable_targets(conn, view.id) if limit is not None else 0
    flight = [store_policy.in_flight(conn, b) for b in ctx.fleet.budgets]
    limits = budgets.rooms(limit, targets, down, ctx.fleet.budgets, flight)
    n, held_by = store_policy.admitted(conn, view.id, batch, after, until, limits)
    if n:
        store_policy.add_started(conn, view.id, batch, after, after + n)
    return n, None if held_by is None else gate.Hold(gate.HELD_BY_BUDGET, held_by)


def _record_hold(
    conn: Connection,
    view: rollout.RolloutView,
    hold: gate.Hold | None,
    batch: int | None,
    now: datetime,
) -> list[rollout.Event]:
    """Store what holds the rollout back; an event (and audit row) only when it changes."""
    before = store_policy.hold_of(conn, view.id)
    events = gate.hold_events(before, hold, batch)
    if events:
        store_policy.set_hold(
            conn,
            view.id,
            None if hold is None else hold.kind,
            None if hold is None else hold.detail,
        )
        store_rollouts.add_events(conn, view.id, now, events, ACTOR)
    return events


def step(
    conn: Connection,
    rollout_id: str,
    now: datetime,
    hint: int,
    limit: int = TICK_MACHINES,
    policy: PolicyTick | None = None,
) -> rollout.Decision:
    """Decide and apply the next step of one rollout inside the caller's transaction.

    At most `limit` machines are written or judged: a deploying batch whose desired
    generations are not all written gets the next `limit` of them and nothing
    else; otherwise the next window of `limit` positions is judged (set-based in
    SQL, store.verdicts.judge_batch, the twin of rollout.judge), and what follows
    from the whole batch's tally is rollout.advance, pure. A batch of N machines
    thus starts in ceil(N / limit) ticks, and each machine is judged at least every
    ceil(N / limit) ticks.

    DESIGN §11: under `max_unavailable` or a disruption budget the tick does
    LIMITED_SHARE of that work (it also counts the unavailable machines), a batch's
    machines start as the budget allows (store.policy.admitted, the twin of budgets.admit),
    and while some wait the ones started are judged, so that their slots free; the
    next batch starts only inside a maintenance window (policy.gate).
    """
    ctx = policy or PolicyTick()
    view = store_rollouts.load_view(conn, rollout_id)
    if view.status is not RolloutStatus.RUNNING:
        return rollout.Decision()
    if ctx.limited(view):
        limit = limited_share(limit)
    deploying = rollout.deploying_batch(view)
    judged, tally, budget = 0, None, limit
    hold: gate.Hold | None = None
    written = 0
    if deploying is not None:
        first, last = rollout.batch_positions(view, deploying.index)
        progress = ticks.batch_progress(conn, view.id, deploying.index, first)
        started, cursor = progress.started_until, progress.judged_until
        if started < last:
            until = min(last, started + limit)
            if ctx.limited(view):
                n, hold = _admit(conn, view, deploying.index, started, until, now, ctx)
                until = started + n
            if until > started:
                ticks.write_desired(conn, view, deploying.index, started, until, now)
            written = until - started
            if hold is None:
                _record_hold(conn, view, None, deploying.index, now)
                return rollout.Decision(written=written)
            budget -= written
            started = until
        # Judge the started machines (all of the batch, unless a budget holds the rest).
        after = first - 1 if cursor is None or cursor >= started else cursor
        until = min(started, after + max(budget, 0))
        judged, tally = verdicts.judge_batch(conn, view, deploying, now, ACTOR, (after, until))
        budget -= until - after
        next_cursor = until if until < started else None  # after the last: the first
        if next_cursor != cursor:
            ticks.set_judged_until(conn, view.id, deploying.index, next_cursor)
    decision = rollout.advance(view, tally)
    if decision.start_batch is not None:
        windows = ctx.fleet.windows_for(view.policy.windows, view.spec.target_tags)
        waiting = gate.window_hold(windows, ctx.window_now or now, view.spec.health_timeout)
        if waiting is not None:
            decision, hold = gate.without_start(decision), waiting
        elif ctx.limited(view):
            budget = 0  # the next tick starts its machines, as the budget allows
    decision.judged = judged
    decision.written = written
    apply_decision(conn, view, decision, now, hint, budget)
    batch = decision.start_batch if deploying is None else deploying.index
    decision.events.extend(_record_hold(conn, view, hold, batch, now))
    return decision


def tick(
    store: AnyStore,
    hint: int,
    now: datetime | None = None,
    limit: int = TICK_MACHINES,
    policy: PolicyTick | None = None,
) -> int:
    """One transaction over every running rollout; returns how many changed.

    First the reboot leases: those of machines back healthy are released, expired
    ones fail their machine and free their slot (store.leases).
    """
    now = now or utcnow()
    ctx = policy or PolicyTick()
    changed = 0
    with store.transaction() as conn:
        if leases.release_recovered(conn, now, ACTOR) or leases.expire(conn, now, ACTOR):
            changed += 1
        for r in ticks.to_visit(conn):
            if r.revert_after is not None:  # a revert larger than one tick, continued
                ticks.revert(conn, r.id, r.name, r.revert_after, limit, now)
                changed += 1
            if r.status is not RolloutStatus.RUNNING:
                continue
            decision = step(conn, r.id, now, hint, limit, ctx)
            if not decision.empty or decision.events:
                changed += 1
                for e in decision.events:
                    if e.kind.startswith("rollout-") or e.kind.startswith("batch-"):
                        log.info("rollout %s: %s %s", r.id, e.kind, dict(e.detail) or "")
    return changed


def job(settings: Settings, store: AnyStore) -> None:
    """The background job (controlplane.background.JOBS)."""
    now = utcnow()
    ctx = PolicyTick(settings.fleet_policy, settings.stale_after, settings.policy_now(now))
    tick(store, settings.rollout_poll_hint, now, policy=ctx)
