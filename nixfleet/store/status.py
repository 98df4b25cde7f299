"""The fleet's status as set-based SQL: the SQL forms of sync, health and stale, the one
SQL form of a filters.MachineFilter, and GET /api/v1/status written by SQLite itself.

The pure definitions live in models.py (sync_of, health_of, is_stale); the forms here
are held to them case by case by tests/store/test_machines.py and test_fleet.py.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import datetime

from nixfleet.filters import MachineFilter
from nixfleet.models import (
    Health,
    Lifecycle,
    Sync,
    counts_in_sync_summary,
    isoformat,
    stale_cutoff,
)

# The SQL forms of models.sync_of, health_of and is_stale, for set-based reads; held
# to them case by case by tests/store/test_machines.py and tests/store/test_fleet.py.
# STALE_SQL takes the cutoff (models.stale_cutoff, stored form) as its one parameter;
# stored times are fixed width (models.TIME_FORMAT), so string order is time order.
SYNC_SQL = (
    "CASE WHEN m.desired_generation IS NULL THEN 'no desired' "
    "WHEN m.current_generation = m.desired_generation THEN 'in sync' "
    "WHEN m.failed_generation = m.desired_generation THEN 'failed' ELSE 'updating' END"
)
HEALTH_SQL = (
    "CASE WHEN m.health_json IS NULL THEN 'unknown' "
    "WHEN json_extract(m.health_json, '$.all_passed') THEN 'healthy' ELSE 'failing' END"
)
STALE_SQL = (
    "(m.lifecycle <> 'decommissioned' AND m.last_report_at IS NOT NULL AND m.last_report_at < ?)"
)
# models.counts_in_sync_summary
SUMMARY_SQL = "(m.lifecycle <> 'decommissioned')"

# filters.SORT_KEYS as SQL; every order ends with the id.
SORT_SQL: dict[str, str] = {
    "host": "m.id",
    "lifecycle": "m.lifecycle",
    "sync": SYNC_SQL,
    "health": HEALTH_SQL,
    "last-report": "coalesce(m.last_report_at, '')",
}


def filter_sql(f: MachineFilter, cutoff: str) -> tuple[str, list[object]]:
    """The filter as one SQL condition over machines m ('' when there is none).

    The one SQL form of a filters.MachineFilter (status, machine list, dashboard).
    """
    clauses: list[str] = []
    params: list[object] = []
    wanted = sorted(set(f.tags))
    if wanted:
        marks = ",".join("?" * len(wanted))
        clauses.append(
            f"m.id IN (SELECT machine_id FROM machine_tags WHERE tag IN ({marks}) "
            "GROUP BY machine_id HAVING COUNT(DISTINCT tag) = ?)"
        )
        params += [*wanted, len(wanted)]
    unwanted = sorted(set(f.not_tags))
    if unwanted:
        # One set built from the tag index, then a lookup per machine: ~35 % less CPU at
        # 100,000 machines than a correlated NOT EXISTS (docs/performance.md, Dashboard).
        clauses.append(
            "m.id NOT IN (SELECT machine_id FROM machine_tags "
            f"WHERE tag IN ({','.join('?' * len(unwanted))}))"
        )
        params += unwanted
    for expr, value in (
        ("m.lifecycle", f.lifecycle),
        (f"({SYNC_SQL})", f.sync),
        (f"({HEALTH_SQL})", f.health),
    ):
        if value is not None:
            clauses.append(f"{expr} = ?")
            params.append(value.value)
    if f.stale is not None:
        clauses.append(STALE_SQL if f.stale else f"NOT {STALE_SQL}")
        params.append(cutoff)
    if f.search:
        if any(c in f.search for c in "*?["):
            clauses.append("m.id GLOB ?")
            params.append(f.search)
        else:
            clauses.append("instr(lower(m.id), lower(?)) > 0")
            params.append(f.search)
    return " AND ".join(clauses), params


def order_sql(f: MachineFilter) -> str:
    direction = "DESC" if f.descending else "ASC"
    return f"{SORT_SQL.get(f.sort, 'm.id')} {direction}, m.id {direction}"


# A machine's entry in GET /api/v1/status, field by field, as SQL writes it: the same
# keys and values as api.machines.status_json, which is the definition (held to it
# machine by machine by tests/api/test_status_shape.py). STALE_SQL takes the cutoff.
STATUS_SQL: dict[str, str] = {
    "id": "m.id",
    "lifecycle": "m.lifecycle",
    "current_generation": "m.current_generation",
    "desired_generation": "m.desired_generation",
    "sync": SYNC_SQL,
    "health_status": HEALTH_SQL,
    "failed_generation": "m.failed_generation",
    "last_report_at": "m.last_report_at",
    "stale": f"json(CASE WHEN {STALE_SQL} THEN 'true' ELSE 'false' END)",
    "system_state": "m.system_state",
    "last_message": "m.last_message",
    "needs_reboot": (
        "json(CASE m.needs_reboot WHEN 1 THEN 'true' WHEN 0 THEN 'false' ELSE 'null' END)"
    ),
    "tags": "json(m.tags_json)",
}


@dataclass(frozen=True)
class StatusDocument:
    machines_json: str  # the JSON array of machines, as SQLite wrote it
    by_sync: dict[str, int]  # counts by Sync value, plus "stale" and "total"
    by_health: dict[str, int]  # counts by Health value (the same machines as by_sync)
    by_lifecycle: dict[str, int]


def status_document(
    conn: sqlite3.Connection,
    f: MachineFilter,
    now: datetime,
    stale_after: int,
) -> StatusDocument:
    """The status object of every machine f selects (docs/fleet-status.md), and counts.

    One statement, one scan: SQLite writes each machine's JSON (tags from the row's
    tags_json, kept by triggers), joins them into the array and counts the summary
    in the same pass, so no Python object per machine (the measurements are in
    docs/performance.md). The inner ORDER BY feeds group_concat in f's order: SQLite
    does not flatten an ordered sub-query into an aggregate.
    """
    cutoff = isoformat(stale_cutoff(now, stale_after))
    pred, params = filter_sql(f, cutoff)
    where = f" WHERE {pred}" if pred else ""
    syncs = [s.value for s in Sync]
    healths = [h.value for h in Health]
    lifecycles = [life.value for life in Lifecycle]
    sums = ", ".join(
        [f"sum(sync = '{v}' AND counted) AS \"sync:{v}\"" for v in syncs]
        + [f"sum(health = '{v}' AND counted) AS \"health:{v}\"" for v in healths]
        + [f"sum(lifecycle = '{v}') AS \"lifecycle:{v}\"" for v in lifecycles]
    )
    fields = ", ".join(f"'{key}', {expr}" for key, expr in STATUS_SQL.items())
    stale_params = [cutoff] * "".join(STATUS_SQL.values()).count("?")
    sql = (
        "SELECT '[' || coalesce(group_concat(o, ','), '') || ']' AS machines, "
        f"coalesce(sum(counted), 0) AS total, coalesce(sum(stale), 0) AS stale, {sums} FROM ("
        f"SELECT json_object({fields}) AS o, "
        f"{SYNC_SQL} AS sync, {HEALTH_SQL} AS health, {STALE_SQL} AS stale, "
        f"{SUMMARY_SQL} AS counted, m.lifecycle AS lifecycle "
        f"FROM machines m{where} ORDER BY {order_sql(f)})"
    )
    row = conn.execute(sql, (*stale_params, cutoff, *params)).fetchone()
    by_sync = {v: int(row[f"sync:{v}"] or 0) for v in syncs}
    by_sync.update(total=int(row["total"]), stale=int(row["stale"]))
    by_health = {v: int(row[f"health:{v}"] or 0) for v in healths}
    by_lifecycle = {v: int(row[f"lifecycle:{v}"] or 0) for v in lifecycles}
    return StatusDocument(row["machines"], by_sync, by_health, by_lifecycle)


@dataclass(frozen=True)
class FleetCounts:
    by_sync: dict[Sync, int]
    by_health: dict[Health, int]
    by_lifecycle: dict[Lifecycle, int]


def fleet_counts(conn: sqlite3.Connection) -> FleetCounts:
    """Machines by sync and by health (decommissioned ones not counted, as in the status
    summary) and by lifecycle, every value present (zero where none)."""
    by_sync = {s: 0 for s in Sync}
    by_health = {h: 0 for h in Health}
    by_lifecycle = {life: 0 for life in Lifecycle}
    for sync, health, lifecycle, n in conn.execute(
        f"SELECT {SYNC_SQL}, {HEALTH_SQL}, m.lifecycle, COUNT(*) FROM machines m GROUP BY 1, 2, 3"
    ):
        if counts_in_sync_summary(Lifecycle(lifecycle)):
            by_sync[Sync(sync)] += n
            by_health[Health(health)] += n
        by_lifecycle[Lifecycle(lifecycle)] += n
    return FleetCounts(by_sync, by_health, by_lifecycle)


def stale_count(conn: sqlite3.Connection, now: datetime, stale_after: int) -> int:
    """How many machines are stale (models.is_stale), as the status summary counts them."""
    cutoff = isoformat(stale_cutoff(now, stale_after))
    return int(
        conn.execute(f"SELECT count(*) FROM machines m WHERE {STALE_SQL}", (cutoff,)).fetchone()[0]
    )
