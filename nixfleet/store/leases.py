"""Reboot leases in the database: take, release, expire (DESIGN §11).

The semaphore rules are nixfleet.policy.leases' (pure); this module reads the facts
they need (the machine's tags, its running rollout, the live leases of its groups),
writes what was decided inside the caller's transaction, and records each change as
a rollout event and an audit row.

On PostgreSQL `take` holds locks.LEASES to the commit: it counts a group's leases and
then adds one, which two machines taking the last slot at once would both do.
Releasing and expiring need none: they DELETE … RETURNING, so a lease goes once and
only the transaction that deleted it writes its events.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from nixfleet import policy, rollout, wire
from nixfleet.errors import ConflictError, NotFoundError
from nixfleet.models import isoformat, parse_time
from nixfleet.policy import leases, windows
from nixfleet.policy.fleet import FleetPolicy
from nixfleet.policy.reboot import RebootPolicy
from nixfleet.store import audit, locks
from nixfleet.store import rollouts as store_rollouts
from nixfleet.store.conn import Connection, Row, is_postgresql


@dataclass(frozen=True)
class RebootContext:
    """What decides whether a machine may reboot now."""

    tags: tuple[str, ...]
    rollout_id: str | None
    rollout_name: str | None
    reboot: RebootPolicy
    windows: tuple[windows.Window, ...]


def context(conn: Connection, machine_id: str, fleet: FleetPolicy) -> RebootContext:
    row = conn.execute(
        "SELECT m.tags_json, r.id, r.name, r.document_json FROM machines m "
        "LEFT JOIN rollout_machines rm ON rm.machine_id = m.id AND rm.rollout_id IN "
        "(SELECT id FROM rollouts WHERE status = 'running') "
        "LEFT JOIN rollouts r ON r.id = rm.rollout_id WHERE m.id = ? LIMIT 1",
        (machine_id,),
    ).fetchone()
    if row is None:
        raise NotFoundError(f"no machine {machine_id!r}; see `nixfleet machines list`")
    tags = tuple(json.loads(row[0]))
    if row[1] is None:
        return RebootContext(tags, None, None, RebootPolicy.NEVER, ())
    doc = json.loads(row[3])
    p = policy.from_document(doc)
    spec = rollout.spec_from_document(doc)
    return RebootContext(
        tags, row[1], row[2], p.reboot, fleet.windows_for(p.windows, spec.target_tags)
    )


def _lease(r: Row) -> leases.Lease:
    acquired, expires = parse_time(r[2]), parse_time(r[3])
    assert acquired is not None and expires is not None
    return leases.Lease(r[0], r[1], acquired, expires)


def held(conn: Connection, groups: list[str]) -> list[leases.Lease]:
    marks = ",".join("?" * len(groups))
    return [
        _lease(r)
        for r in conn.execute(
            f"SELECT grp, machine_id, acquired_at, expires_at FROM reboot_leases "
            f"WHERE grp IN ({marks}) ORDER BY acquired_at, grp, machine_id",
            groups,
        )
    ]


def lease_json(lease: leases.Lease) -> wire.RebootLease:
    return {
        "group": lease.group,
        "machine": lease.machine_id,
        "acquired_at": isoformat(lease.acquired_at),
        "expires_at": isoformat(lease.expires_at),
    }


def take(
    conn: Connection,
    machine_id: str,
    fleet: FleetPolicy,
    now: datetime,
    actor: str,
    window_now: datetime | None = None,
) -> wire.RebootLeases:
    """Grant the machine its reboot slots, or raise ConflictError saying why not yet.

    `window_now` is the clock windows are judged by (settings.policy_now; `now`).
    """
    window_now = window_now or now
    if is_postgresql(conn):
        conn.execute("SELECT pg_advisory_xact_lock(?)", (locks.LEASES,))
    ctx = context(conn, machine_id, fleet)
    mine = leases.groups_for(ctx.tags, fleet.reboot_groups, fleet.reboot_slots)
    current = held(conn, [g.name for g in mine])
    have = leases.take(machine_id, mine, current, now, fleet.reboot_timeout)
    if have.granted and not have.new:  # recursive: the lease it holds, unchanged
        return {"granted": True, "leases": [lease_json(x) for x in have.leases]}
    if ctx.rollout_id is None or ctx.reboot is not RebootPolicy.WHEN_NEEDED:
        why = (
            "it is in no running rollout"
            if ctx.rollout_id is None
            else f"its rollout {ctx.rollout_name!r} says reboot: {ctx.reboot}"
        )
        raise ConflictError(
            f"machine {machine_id!r} may not reboot now: {why}; "
            "a rollout with `reboot: when-needed` coordinates reboots"
        )
    if not windows.is_open(ctx.windows, window_now):
        nxt = windows.next_open(ctx.windows, window_now)
        raise ConflictError(
            f"machine {machine_id!r} may not reboot now: outside the maintenance windows of "
            f"rollout {ctx.rollout_name!r}; the next opens at {isoformat(nxt)}"
        )
    if not have.granted:
        assert have.holders is not None
        busy = "; ".join(f"group {g} is full ({', '.join(have.holders[g])})" for g in have.full)
        raise ConflictError(f"machine {machine_id!r} must wait for a reboot slot: {busy}")
    conn.executemany(
        "INSERT INTO reboot_leases (grp, machine_id, rollout_id, acquired_at, expires_at) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT (grp, machine_id) DO UPDATE SET "
        "rollout_id = excluded.rollout_id, acquired_at = excluded.acquired_at, "
        "expires_at = excluded.expires_at",
        [
            (
                x.group,
                x.machine_id,
                ctx.rollout_id,
                isoformat(x.acquired_at),
                isoformat(x.expires_at),
            )
            for x in have.new
        ],
    )
    detail = {
        "groups": [x.group for x in have.leases],
        "expires_at": isoformat(have.new[0].expires_at),
    }
    store_rollouts.add_events(
        conn,
        ctx.rollout_id,
        now,
        [rollout.Event("machine-rebooting", machine_id=machine_id, detail=detail)],
        actor,
    )
    return {"granted": True, "leases": [lease_json(x) for x in have.leases]}


def release(conn: Connection, machine_id: str, now: datetime, actor: str) -> int:
    """Give the machine's leases back; releasing none is fine (idempotent)."""
    rows = conn.execute(
        "DELETE FROM reboot_leases WHERE machine_id = ? RETURNING grp, rollout_id", (machine_id,)
    ).fetchall()
    if not rows:
        return 0
    detail = {"groups": sorted(r[0] for r in rows)}
    rollout_id = next((r[1] for r in rows if r[1] is not None), None)
    if rollout_id is not None:
        store_rollouts.add_events(
            conn,
            rollout_id,
            now,
            [rollout.Event("machine-rebooted", machine_id=machine_id, detail=detail)],
            actor,
        )
    else:
        audit.record(conn, actor, "machine.reboot-lease-released", machine_id, now, detail)
    return len(rows)


def release_recovered(conn: Connection, now: datetime, actor: str) -> list[str]:
    """Leases of machines back healthy on their booted generation, released by the CP.

    The agent releases its own lease (DELETE); this covers an agent that cannot
    (its lease file lost, the CP unreachable at that moment). Back = a successful
    report after the lease was taken that needs no reboot.
    """
    rows = conn.execute(
        "SELECT DISTINCT l.machine_id FROM reboot_leases l JOIN machines m ON m.id = l.machine_id "
        "WHERE m.last_report_at > l.acquired_at AND m.needs_reboot = 0 AND m.last_success = 1 "
        "AND m.system_state IN ('ok', 'unknown') ORDER BY l.machine_id"
    ).fetchall()
    done = [r[0] for r in rows]
    for machine_id in done:
        release(conn, machine_id, now, actor)
    return done


def expire(conn: Connection, now: datetime, actor: str) -> list[str]:
    """Expired leases become failed machines and free their slots; returns the machines.

    The machine's verdict in its running rollout turns unhealthy (the batch's failure
    threshold then decides), so a machine that never comes back cannot hold the fleet.
    """
    rows = conn.execute(
        "DELETE FROM reboot_leases WHERE expires_at <= ? RETURNING machine_id, rollout_id, "
        "acquired_at",
        (isoformat(now),),
    ).fetchall()
    seen: dict[str, tuple[str | None, str]] = {}
    for machine_id, rollout_id, acquired in rows:
        seen.setdefault(machine_id, (rollout_id, acquired))
    for machine_id, (rollout_id, acquired) in sorted(seen.items()):
        reason = f"did not come back healthy from a reboot started at {acquired}"
        if rollout_id is not None:
            conn.execute(
                "UPDATE rollout_machines SET health = 'unhealthy', reason = ?, decided_at = ? "
                "WHERE rollout_id = ? AND machine_id = ? AND health != 'unhealthy'",
                (reason, isoformat(now), rollout_id, machine_id),
            )
            store_rollouts.add_events(
                conn,
                rollout_id,
                now,
                [
                    rollout.Event(
                        "reboot-lease-expired", machine_id=machine_id, detail={"reason": reason}
                    ),
                    rollout.Event(
                        "machine-unhealthy", machine_id=machine_id, detail={"reason": reason}
                    ),
                ],
                actor,
            )
        else:
            audit.record(
                conn, actor, "machine.reboot-lease-expired", machine_id, now, {"reason": reason}
            )
    return sorted(seen)


def holders(conn: Connection) -> dict[str, list[str]]:
    """machine -> its groups, for status views (few rows: at most the slots)."""
    out: dict[str, list[str]] = {}
    for grp, machine_id in conn.execute("SELECT grp, machine_id FROM reboot_leases ORDER BY grp"):
        out.setdefault(machine_id, []).append(grp)
    return out
