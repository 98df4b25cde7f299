"""The fleet's status as set-based SQL: the SQL forms of sync and stale, the one SQL
form of a filters.MachineFilter, the summary's counts, and GET /api/v1/status written
by SQLite itself.

The pure definitions live in models.py (sync_of, health_of, is_stale); sync and stale
here are held to them case by case by tests/store/test_machines.py and test_fleet.py;
health is stored with each report (record_report writes health_of of it).
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
    isoformat,
    stale_cutoff,
)

# The SQL forms of models.sync_of and is_stale, for set-based reads; held to them case
# by case by tests/store/test_machines.py and tests/store/test_fleet.py.
# STALE_SQL takes the cutoff (models.stale_cutoff, stored form) as its one parameter;
# stored times are fixed width (models.TIME_FORMAT), so string order is time order.
SYNC_SQL = (
    "CASE WHEN m.desired_generation IS NULL THEN 'no desired' "
    "WHEN m.current_generation = m.desired_generation THEN 'in sync' "
    "WHEN m.failed_generation = m.desired_generation THEN 'failed' ELSE 'updating' END"
)
# Health is stored with the report that set it (models.health_of, migration 0020).
HEALTH_SQL = "m.health"
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
# The booleans are constant JSON (json('true'), factored out of the scan by SQLite)
# rather than json() of a per-row text: ~30 % of the statement at 100,000 machines.
STATUS_SQL: dict[str, str] = {
    "id": "m.id",
    "lifecycle": "m.lifecycle",
    "current_generation": "m.current_generation",
    "desired_generation": "m.desired_generation",
    "sync": SYNC_SQL,
    "health_status": HEALTH_SQL,
    "failed_generation": "m.failed_generation",
    "last_report_at": "m.last_report_at",
    "stale": f"CASE WHEN {STALE_SQL} THEN json('true') ELSE json('false') END",
    "system_state": "m.system_state",
    "last_message": "m.last_message",
    "needs_reboot": "CASE m.needs_reboot WHEN 1 THEN json('true') WHEN 0 THEN json('false') END",
    "tags": "json(m.tags_json)",
}


@dataclass(frozen=True)
class Counts:
    """The machines a condition selects, counted as the status summary counts them."""

    selected: int  # every machine selected, decommissioned ones included
    counted: int  # of them, those the sync summary counts (models.counts_in_sync_summary)
    stale: int
    by_sync: dict[Sync, int]  # the counted machines by sync, every value present
    by_health: dict[Health, int]  # the counted machines by health
    by_lifecycle: dict[Lifecycle, int]  # every selected machine by lifecycle


def counts(conn: sqlite3.Connection, pred: str, params: list[object], cutoff: str) -> Counts:
    """Counts of the machines `pred` selects (a filter_sql condition; '' for all).

    Two statements, each the cheapest form of its part at 100,000 machines
    (docs/performance.md, "Session 6"): the lifecycles from the lifecycle index, and
    sync, health and stale in one pass whose ordered sub-query SQLite does not
    flatten, so that each machine's sync, health and stale are computed once rather
    than once per sum (~2.5x less CPU than one pass of 14 sums). Stale is not counted
    from the last-report index: when the whole fleet is stale (the control plane back
    from an outage) that is a table look-up per machine, 4x slower than the scan.
    """
    where, also = (f" WHERE {pred}", f" AND ({pred})") if pred else ("", "")
    by_lifecycle = {life: 0 for life in Lifecycle}
    for life, n in conn.execute(
        f"SELECT m.lifecycle, count(*) FROM machines m{where} GROUP BY m.lifecycle", params
    ):
        by_lifecycle[Lifecycle(life)] = int(n)
    sums = ", ".join(
        [f"coalesce(sum(sync = '{s.value}'), 0)" for s in Sync]
        + [f"coalesce(sum(health = '{h.value}'), 0)" for h in Health]
    )
    row = conn.execute(
        f"SELECT count(*), coalesce(sum(stale), 0), {sums} FROM (SELECT {SYNC_SQL} AS sync, "
        f"{HEALTH_SQL} AS health, {STALE_SQL} AS stale "
        f"FROM machines m WHERE {SUMMARY_SQL}{also} ORDER BY m.id)",
        (cutoff, *params),
    ).fetchone()
    n = [int(v) for v in row[2:]]
    return Counts(
        selected=sum(by_lifecycle.values()),
        counted=int(row[0]),
        stale=int(row[1]),
        by_sync=dict(zip(Sync, n[: len(Sync)], strict=True)),
        by_health=dict(zip(Health, n[len(Sync) :], strict=True)),
        by_lifecycle=by_lifecycle,
    )


@dataclass(frozen=True)
class StatusDocument:
    machines_json: bytes  # the JSON array's items, as SQLite wrote them (UTF-8), no brackets
    counts: Counts  # of the same machines, in the same read


def status_document(
    conn: sqlite3.Connection,
    f: MachineFilter,
    now: datetime,
    stale_after: int,
) -> StatusDocument:
    """The status object of every machine f selects (docs/fleet-status.md), and counts.

    SQLite writes each machine's JSON (tags from the row's tags_json, kept by
    triggers) and joins them into the array, so no Python object per machine (the
    measurements are in docs/performance.md). The inner ORDER BY feeds group_concat
    in f's order: SQLite does not flatten an ordered sub-query into an aggregate.
    The items come back as bytes (a BLOB) without the array's brackets: never decoded
    into a str and encoded again, nor copied twice more by SQL concatenation (~55 ms).
    Call it inside Store.read(), so that the array and the counts are one snapshot.
    """
    cutoff = isoformat(stale_cutoff(now, stale_after))
    pred, params = filter_sql(f, cutoff)
    where = f" WHERE {pred}" if pred else ""
    fields = ", ".join(f"'{key}', {expr}" for key, expr in STATUS_SQL.items())
    stale_params = [cutoff] * "".join(STATUS_SQL.values()).count("?")
    sql = (
        "SELECT CAST(coalesce(group_concat(o, ','), '') AS BLOB) FROM ("
        f"SELECT json_object({fields}) AS o FROM machines m{where} ORDER BY {order_sql(f)})"
    )
    machines_json = conn.execute(sql, (*stale_params, *params)).fetchone()[0]
    return StatusDocument(machines_json, counts(conn, pred, params, cutoff))
