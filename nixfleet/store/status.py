"""The fleet's status as set-based SQL: the SQL forms of sync and stale, the one SQL
form of a filters.MachineFilter, the summary's counts, and GET /api/v1/status written
by the database itself.

The pure definitions live in models.py (sync_of, health_of, is_stale); sync and stale
here are held to them case by case, on both backends, by tests/store/test_machines.py
and test_fleet.py; health is stored with each report (record_report writes health_of
of it). SYNC_SQL, STALE_SQL and SUMMARY_SQL are one spelling for both backends (STALE_SQL
is 0/1 on SQLite, a boolean on PostgreSQL); where the dialects differ (GLOB, instr, the
sums of booleans, the JSON functions) PostgreSQL's spelling is beside SQLite's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
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
from nixfleet.store.conn import Connection, is_postgresql

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


def filter_sql(f: MachineFilter, cutoff: str, *, postgresql: bool) -> tuple[str, list[object]]:
    """The filter as one SQL condition over machines m ('' when there is none).

    The one SQL form of a filters.MachineFilter (status, machine list, dashboard), in
    SQLite's or PostgreSQL's spelling (`postgresql`: the host glob and substring).
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
            if not postgresql:
                clauses.append("m.id GLOB ?")
                params.append(f.search)
            elif (regex := glob_regex(f.search)) is None:
                clauses.append("false")
            else:
                clauses.append("m.id ~ ?")
                params.append(regex)
        else:
            clauses.append(f"{'strpos' if postgresql else 'instr'}(lower(m.id), lower(?)) > 0")
            params.append(f.search)
    return " AND ".join(clauses), params


def glob_regex(pattern: str) -> str | None:
    """SQLite's GLOB `pattern` as an anchored PostgreSQL regular expression (for `~`),
    or None where it can match nothing (an unclosed set).

    SQLite's rules (patternCompare in its func.c): `*` any run of characters, `?` one,
    `[…]` one of a set: a leading `^` negates it, a `]` first in it is itself, `a-z`
    is a range (empty when reversed; its start is in the set either way), a `-` not
    between two characters is itself; there is no escape character. Case matters, as
    with `~`. Every character but letters and digits is written escaped (in an ARE a
    backslash before one is that character), inside a set too. Held to SQLite's GLOB
    by tests/store/test_status.py.
    """
    out = ["^"]
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c != "[":
            out.append(_regex_char(c))
        else:
            invert = pattern.startswith("^", i)
            i += invert
            items: list[str] = []
            if pattern.startswith("]", i):
                items.append(_regex_char("]"))
                i += 1
            prior = ""  # the last single character, a range's start (SQLite's prior_c)
            while i < n and pattern[i] != "]":
                c = pattern[i]
                if c == "-" and prior and i + 1 < n and pattern[i + 1] != "]":
                    end = pattern[i + 1]  # prior stays in the set on its own too
                    if prior <= end:
                        items.append(f"{_regex_char(prior)}-{_regex_char(end)}")
                    prior, i = "", i + 2
                else:
                    items.append(_regex_char(c))
                    prior, i = c, i + 1
            if i >= n:
                return None  # unclosed: SQLite matches nothing
            i += 1  # never empty: a `]` first is in the set, a range's start too
            out.append(f"[{'^' if invert else ''}{''.join(items)}]")
    out.append("$")
    return "".join(out)


def _regex_char(c: str) -> str:
    return c if c.isalnum() else "\\" + c


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
    "system_state": "m.system_state",
    "last_message": "m.last_message",
    "needs_reboot": "CASE m.needs_reboot WHEN 1 THEN json('true') WHEN 0 THEN json('false') END",
    "tags": "json(m.tags_json)",
    # Last: the fields that move with every heartbeat and with time alone, which the
    # whole fleet's document kept in memory (api.status_view) writes per request.
    "last_report_at": "m.last_report_at",
    "stale": f"CASE WHEN {STALE_SQL} THEN json('true') ELSE json('false') END",
}
SPLICED = ("last_report_at", "stale")  # the fields api.status_view writes itself
# The same entry on PostgreSQL, each value a column named by its key (row_to_json
# writes the keys in this order, compact): booleans are SQL's, the tags their JSON.
STATUS_SQL_PG: dict[str, str] = {
    **STATUS_SQL,
    "stale": STALE_SQL,
    "needs_reboot": "CASE m.needs_reboot WHEN 1 THEN true WHEN 0 THEN false END",
    "tags": "m.tags_json::json",
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


def counts(conn: Connection, pred: str, params: list[object], cutoff: str) -> Counts:
    """Counts of the machines `pred` selects (a filter_sql condition; '' for all).

    Two statements, each the cheapest form of its part at 100,000 machines
    (docs/performance.md, "Session 6"): the lifecycles from the lifecycle index, and
    sync, health and stale in one pass whose ordered sub-query SQLite does not
    flatten, so that each machine's sync, health and stale are computed once rather
    than once per sum (~2.5x less CPU than one pass of 14 sums). Stale is not counted
    from the last-report index: when the whole fleet is stale (the control plane back
    from an outage) that is a table look-up per machine, 4x slower than the scan.
    PostgreSQL sums no booleans: it counts each value with FILTER, in one pass too.
    """
    where, also = (f" WHERE {pred}", f" AND ({pred})") if pred else ("", "")
    by_lifecycle = {life: 0 for life in Lifecycle}
    for life, n in conn.execute(
        f"SELECT m.lifecycle, count(*) FROM machines m{where} GROUP BY m.lifecycle", params
    ):
        by_lifecycle[Lifecycle(life)] = int(n)
    values = [("sync", s.value) for s in Sync] + [("health", h.value) for h in Health]
    if is_postgresql(conn):
        sums = ", ".join(f"count(*) FILTER (WHERE {c} = '{v}')" for c, v in values)
        sql = (
            f"SELECT count(*), count(*) FILTER (WHERE stale), {sums} FROM (SELECT {SYNC_SQL} "
            f"AS sync, {HEALTH_SQL} AS health, {STALE_SQL} AS stale "
            f"FROM machines m WHERE {SUMMARY_SQL}{also}) AS s"
        )
    else:
        sums = ", ".join(f"coalesce(sum({c} = '{v}'), 0)" for c, v in values)
        sql = (
            f"SELECT count(*), coalesce(sum(stale), 0), {sums} FROM (SELECT {SYNC_SQL} AS sync, "
            f"{HEALTH_SQL} AS health, {STALE_SQL} AS stale "
            f"FROM machines m WHERE {SUMMARY_SQL}{also} ORDER BY m.id)"
        )
    row = conn.execute(sql, (cutoff, *params)).fetchone()
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
    machines_json: bytes  # the JSON array's items, as the database wrote them (UTF-8), no brackets
    counts: Counts  # of the same machines, in the same read


def status_document(
    conn: Connection,
    f: MachineFilter,
    now: datetime,
    stale_after: int,
) -> StatusDocument:
    """The status object of every machine f selects (docs/fleet-status.md), and counts.

    The database writes each machine's JSON (tags from the row's tags_json, kept by
    triggers) and joins them into the array, so no Python object per machine (the
    measurements are in docs/performance.md). On SQLite the inner ORDER BY feeds
    group_concat in f's order: SQLite does not flatten an ordered sub-query into an
    aggregate. The items come back as bytes (a BLOB) without the array's brackets:
    never decoded into a str and encoded again, nor copied twice more by SQL
    concatenation (~55 ms). PostgreSQL orders the aggregate itself (an ordered
    sub-query is not a promise there) and writes each entry with row_to_json of a
    row named field by field (STATUS_SQL_PG); its text is encoded once here (a bytea
    would come back as hex, twice the size). The parsed document is the same on both
    (tests/store/test_status.py). Call it inside the store's read(), so that the
    array and the counts are one snapshot.
    """
    cutoff = isoformat(stale_cutoff(now, stale_after))
    pg = is_postgresql(conn)
    pred, params = filter_sql(f, cutoff, postgresql=pg)
    where = f" WHERE {pred}" if pred else ""
    if pg:
        fields = ", ".join(f"{expr} AS {key}" for key, expr in STATUS_SQL_PG.items())
        stale_params = [cutoff] * "".join(STATUS_SQL_PG.values()).count("?")
        sql = (
            f"SELECT coalesce(string_agg(row_to_json(j)::text, ',' ORDER BY {order_sql(f)}), '') "
            f"FROM machines m CROSS JOIN LATERAL (SELECT {fields}) AS j{where}"
        )
        text: str = conn.execute(sql, (*stale_params, *params)).fetchone()[0]
        machines_json = text.encode()
    else:
        fields = ", ".join(f"'{key}', {expr}" for key, expr in STATUS_SQL.items())
        stale_params = [cutoff] * "".join(STATUS_SQL.values()).count("?")
        sql = (
            "SELECT CAST(coalesce(group_concat(o, ','), '') AS BLOB) FROM ("
            f"SELECT json_object({fields}) AS o FROM machines m{where} ORDER BY {order_sql(f)})"
        )
        machines_json = conn.execute(sql, (*stale_params, *params)).fetchone()[0]
    return StatusDocument(machines_json, counts(conn, pred, params, cutoff))


def entries(conn: Connection, ids: Sequence[str] | None) -> list[tuple[str, str, str, str, str]]:
    """(id, entry, lifecycle, sync, health) of the machines named (every one for None),
    in id order; the entry is the machine's JSON object without the SPLICED fields.

    What api.status_view keeps of each machine, written as status_document writes it
    (json_object on SQLite, row_to_json on PostgreSQL). Call it inside store.read().
    """
    keys = [k for k in STATUS_SQL if k not in SPLICED]
    axes = f"m.lifecycle, {SYNC_SQL}, {HEALTH_SQL}"
    params: list[object] = []
    if is_postgresql(conn):
        fields = ", ".join(f"{STATUS_SQL_PG[k]} AS {k}" for k in keys)
        sql = (
            f"SELECT m.id, row_to_json(j)::text, {axes} "
            f"FROM machines m CROSS JOIN LATERAL (SELECT {fields}) AS j"
        )
        if ids is not None:
            sql += " WHERE m.id = ANY(?::text[])"
            params.append(list(ids))
    else:
        fields = ", ".join(f"'{k}', {STATUS_SQL[k]}" for k in keys)
        sql = f"SELECT m.id, json_object({fields}), {axes} FROM machines m"
        if ids is not None:
            sql += " WHERE m.id IN (SELECT value FROM json_each(?))"
            params.append(json.dumps(list(ids)))
    return [tuple(r) for r in conn.execute(sql + " ORDER BY m.id", params)]


def report_times(conn: Connection, cutoff: str) -> tuple[bytes, bytes, int, int]:
    """Every machine's id and last_report_at (stored form, '' for none), each joined by
    newlines, in one order (not the ids'); the number of machines; how many are stale
    at `cutoff` (STALE_SQL).

    Two strings the database joins in one scan of the index on last_report_at (which
    holds the id too): at 100,000 machines ~4x less CPU than a row per machine, and
    ~3x less than the machines table in id order, whose pages a 64 MiB cache does
    not hold (docs/performance.md). The stale count is STALE_SQL's as two counts
    from the indexes, of every machine and of the decommissioned ones.
    """
    # The decommissioned ones from the lifecycle index (SQLite's `+` keeps the planner
    # off the time index there: all machines stale would be a look-up per machine).
    pg = is_postgresql(conn)
    stale = (
        "(SELECT count(*) FROM machines WHERE last_report_at < ?) - (SELECT count(*) "
        f"FROM machines WHERE lifecycle = 'decommissioned' AND {'' if pg else '+'}"
        "last_report_at < ?)"
    )
    if pg:
        ids, times, n, stale_n = conn.execute(
            "SELECT coalesce(string_agg(m.id, chr(10)), ''), "
            f"coalesce(string_agg(coalesce(m.last_report_at, ''), chr(10)), ''), count(*), "
            f"{stale} FROM machines m",
            (cutoff, cutoff),
        ).fetchone()
        return ids.encode(), times.encode(), int(n), int(stale_n)
    ids, times, n, stale_n = conn.execute(
        "SELECT CAST(coalesce(group_concat(m.id, char(10)), '') AS BLOB), "
        "CAST(coalesce(group_concat(coalesce(m.last_report_at, ''), char(10)), '') AS BLOB), "
        f"count(*), {stale} FROM machines m",
        (cutoff, cutoff),
    ).fetchone()
    return ids, times, int(n), int(stale_n)
