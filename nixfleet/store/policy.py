"""Disruption-budget facts, set-based: who is unavailable, and how far a batch may start.

The SQL twins of nixfleet.policy.budgets: `UNAVAILABLE_SQL` is `unavailable()` over
every machine at once and `admitted` is `admit()` over a batch's next positions;
tests/store/test_policy.py holds each to its pure definition on a table of cases.

Nothing here runs per machine in Python. A tick that starts machines under a budget
first collects the unavailable machines into a temp table (a scan of the active
rollouts' started, not yet healthy machines, plus the stale, failing and rebooting
ones: few rows), then counts from it per rollout and per budget. The temp tables
are the connection's own (`temp.` on SQLite, `pg_temp.` on PostgreSQL, where a pooled
connection keeps them for its next transaction: each is emptied before it is filled).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timedelta

from nixfleet.models import isoformat
from nixfleet.policy.budgets import Budget, Room
from nixfleet.store.conn import Connection, is_postgresql

# Started: its batch began and the batch's desired generations reached its position.
# Unavailable (budgets.unavailable): stale, failing, rebooting, or started in an active
# rollout and not yet healthy. :cutoff is the stale cutoff (stored time form).
UNAVAILABLE_SQL = """
SELECT rm.machine_id, rm.rollout_id FROM rollout_machines rm
JOIN rollout_batches b ON b.rollout_id = rm.rollout_id AND b.idx = rm.batch_idx
WHERE rm.rollout_id IN (SELECT id FROM rollouts WHERE status IN ('running', 'paused'))
  AND b.started_at IS NOT NULL AND b.status IN ('deploying', 'succeeded', 'failed')
  AND rm.position <= coalesce(b.started_until, -1) AND rm.health != 'healthy'
UNION ALL
SELECT m.id, NULL FROM machines m
WHERE m.last_report_at < :cutoff AND m.lifecycle != 'decommissioned'
UNION ALL
SELECT m.id, NULL FROM machines m
WHERE m.system_state IN ('error', 'degraded') AND m.lifecycle != 'decommissioned'
UNION ALL
SELECT machine_id, rollout_id FROM reboot_leases
"""
# UNION ALL: a machine may be listed more than once; every count of it is DISTINCT
# (and a UNION's two temp B-trees cost ~20 ms at 100,000 machines). The stale and the
# troubled machines are two branches so that each is an index search (migration
# 0019), not a scan of every machine.


def _has_tags(column: str, tags: Sequence[str]) -> tuple[str, list[str]]:
    """SQL true when the machine in `column` carries every tag (all-of selector)."""
    marks = ",".join("?" * len(tags))
    return (
        f"(SELECT COUNT(DISTINCT t.tag) FROM machine_tags t WHERE t.machine_id = {column} "
        f"AND t.tag IN ({marks})) = {len(tags)}",
        list(tags),
    )


def _temp(conn: Connection) -> str:
    """The schema of the connection's temp tables."""
    return "pg_temp" if is_postgresql(conn) else "temp"


def collect(conn: Connection, now: datetime, stale_after: int) -> None:
    """(Re)fill temp.unavailable with every unavailable machine, once per tick."""
    temp = _temp(conn)
    conn.execute(
        "CREATE TEMP TABLE IF NOT EXISTS unavailable (machine_id TEXT NOT NULL, rollout_id TEXT)"
    )
    conn.execute(f"DELETE FROM {temp}.unavailable")
    cutoff = isoformat(now - timedelta(seconds=stale_after))
    conn.execute(f"INSERT INTO {temp}.unavailable " + UNAVAILABLE_SQL, {"cutoff": cutoff})


def add_started(conn: Connection, rollout_id: str, batch: int, after: int, until: int) -> None:
    """Machines a tick just started count as unavailable for the rest of the tick."""
    conn.execute(
        f"INSERT INTO {_temp(conn)}.unavailable SELECT machine_id, rollout_id "
        "FROM rollout_machines WHERE rollout_id = ? AND batch_idx = ? AND position > ? "
        "AND position <= ?",
        (rollout_id, batch, after, until),
    )


def unavailable_targets(conn: Connection, rollout_id: str) -> int:
    """The rollout's targets that are unavailable now (each machine once)."""
    # A primary-key look-up per unavailable machine (few), not an IN list built from
    # every target of the rollout (100,000 rows, every tick).
    row = conn.execute(
        f"SELECT COUNT(DISTINCT u.machine_id) FROM {_temp(conn)}.unavailable u "
        "JOIN rollout_machines rm ON rm.rollout_id = ? AND rm.machine_id = u.machine_id",
        (rollout_id,),
    ).fetchone()
    return int(row[0])


def in_flight(conn: Connection, budget: Budget) -> int:
    """Machines carrying all of the budget's tags that are unavailable now."""
    has, params = _has_tags("u.machine_id", budget.tags)
    row = conn.execute(
        f"SELECT COUNT(DISTINCT u.machine_id) FROM {_temp(conn)}.unavailable u WHERE {has}",
        params,
    ).fetchone()
    return int(row[0])


def admitted(
    conn: Connection,
    rollout_id: str,
    batch: int,
    after: int,
    until: int,
    limits: Sequence[Room],
) -> tuple[int, str | None]:
    """How many positions after `after` (up to `until`) start now, and what holds the next.

    The SQL form of budgets.admit: the first position that would overflow a limit is,
    for a limit applying to every machine, `after + free + 1`, and for a tag budget the
    (free + 1)-th position carrying its tags; machines start up to the smallest.
    """
    stop, held_by = until + 1, None
    for room in limits:
        if room.tags is None:
            bound = after + room.free + 1
        else:
            has, params = _has_tags("rm.machine_id", room.tags)
            row = conn.execute(
                "SELECT rm.position FROM rollout_machines rm WHERE rm.rollout_id = ? "
                f"AND rm.batch_idx = ? AND rm.position > ? AND rm.position < ? AND {has} "
                "ORDER BY rm.position LIMIT 1 OFFSET ?",
                (rollout_id, batch, after, stop, *params, room.free),
            ).fetchone()
            if row is None:
                continue
            bound = int(row[0])
        if bound < stop:
            stop, held_by = bound, room.label
    return stop - 1 - after, held_by


def hold_of(conn: Connection, rollout_id: str) -> tuple[str | None, str | None]:
    """What holds the rollout back, as last recorded (kind, detail)."""
    row = conn.execute(
        "SELECT hold, hold_detail FROM rollouts WHERE id = ?", (rollout_id,)
    ).fetchone()
    return (row[0], row[1]) if row is not None else (None, None)


def set_hold(conn: Connection, rollout_id: str, kind: str | None, detail: str | None) -> None:
    conn.execute(
        "UPDATE rollouts SET hold = ?, hold_detail = ? WHERE id = ?", (kind, detail, rollout_id)
    )


def plan_facts(
    conn: Connection,
    hosts: Sequence[str],
    now: datetime,
    stale_after: int,
    budgets: Sequence[Budget],
) -> tuple[dict[str, frozenset[str]], int, list[int]]:
    """For `rollout plan`: each target's tags, how many targets are unavailable now, and
    each budget's machines in flight now (the counts `budgets.rooms` takes)."""
    if is_postgresql(conn):
        return _plan_facts_pg(conn, hosts, now, stale_after, budgets)
    collect(conn, now, stale_after)
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS plan_hosts (id TEXT PRIMARY KEY)")
    conn.execute("DELETE FROM temp.plan_hosts")
    conn.executemany("INSERT OR IGNORE INTO temp.plan_hosts VALUES (?)", ((h,) for h in hosts))
    tags = {
        r[0]: frozenset(json.loads(r[1]))
        for r in conn.execute(
            "SELECT m.id, m.tags_json FROM machines m JOIN temp.plan_hosts p ON p.id = m.id"
        )
    }
    down = conn.execute(
        "SELECT COUNT(DISTINCT u.machine_id) FROM temp.unavailable u "
        "JOIN temp.plan_hosts p ON p.id = u.machine_id"
    ).fetchone()[0]
    flight = [in_flight(conn, b) for b in budgets]
    conn.execute("DELETE FROM temp.plan_hosts")
    return tags, int(down), flight


def _plan_facts_pg(
    conn: Connection,
    hosts: Sequence[str],
    now: datetime,
    stale_after: int,
    budgets: Sequence[Budget],
) -> tuple[dict[str, frozenset[str]], int, list[int]]:
    """plan_facts on PostgreSQL, which creates no temp table in a read-only transaction
    (`rollout plan` runs in one): the unavailable machines are a CTE, the hosts an array."""
    cutoff = isoformat(now - timedelta(seconds=stale_after))
    hosts = list(hosts)
    tags = {
        r[0]: frozenset(json.loads(r[1]))
        for r in conn.execute(
            "SELECT id, tags_json FROM machines WHERE id = ANY(CAST(:hosts AS TEXT[]))",
            {"hosts": hosts},
        )
    }
    unavailable = (
        f"WITH u AS MATERIALIZED ({UNAVAILABLE_SQL}) SELECT COUNT(DISTINCT u.machine_id) FROM u "
    )
    down = conn.execute(
        unavailable + "WHERE u.machine_id = ANY(CAST(:hosts AS TEXT[]))",
        {"cutoff": cutoff, "hosts": hosts},
    ).fetchone()[0]
    flight = [
        int(
            conn.execute(
                unavailable + "WHERE (SELECT COUNT(DISTINCT t.tag) FROM machine_tags t "
                "WHERE t.machine_id = u.machine_id AND t.tag = ANY(CAST(:tags AS TEXT[]))) = :n",
                {"cutoff": cutoff, "tags": list(b.tags), "n": len(b.tags)},
            ).fetchone()[0]
        )
        for b in budgets
    ]
    return tags, int(down), flight
