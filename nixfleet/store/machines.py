"""Machines, their tags and desired generations.

Reads are set-based: a listing is two queries (machines, then their tags), whatever
the fleet size. Writes take the connection of an open transaction from the caller,
so one API request is one transaction. Where PostgreSQL's SQL differs, its spelling
is beside SQLite's, chosen by `is_postgresql(conn)`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import datetime

from nixfleet import history as changes
from nixfleet.errors import ConflictError, FieldError, GoneError, NotFoundError, ValidationError
from nixfleet.filters import MachineFilter
from nixfleet.models import (
    Lifecycle,
    Machine,
    Report,
    SystemState,
    check_transition,
    health_of,
    isoformat,
    parse_time,
    stale_cutoff,
    utcnow,
)
from nixfleet.store import history, report_cache
from nixfleet.store.conn import Connection, Row, is_postgresql
from nixfleet.store.rows import health_from_stored, health_to_stored
from nixfleet.store.status import filter_sql, order_sql

MAX_TAGS_PER_SOURCE = 64  # as the tags schema's maxItems: one request cannot add more
# machine_tag_rows.source (migration 0022); the machine_tags view reads them back as
# the names (tests/store/test_migrations.py holds the two to each other).
TAG_SOURCES = {"agent": 1, "operator": 2}
_DELETE_TAG = (
    "DELETE FROM machine_tag_rows WHERE machine = "
    "(SELECT num FROM machine_numbers WHERE machine_id = ?) AND tag = ? AND source = ?"
)

COLUMNS = (
    "id, lifecycle, registered_at, current_generation, desired_generation, "
    "desired_cache_url, desired_source, last_report_at, agent_version, system_state, "
    "last_success, last_message, failed_generation, health_json, retry_requested_at, "
    "uptime_seconds, needs_reboot, booted_generation"
)


def _filter_sql(
    tags: Sequence[str], lifecycle: str | None, alias: str = ""
) -> tuple[str, list[object]]:
    """WHERE clause selecting machines carrying all tags (and the lifecycle, if given)."""
    clauses: list[str] = []
    params: list[object] = []
    if lifecycle is not None:
        clauses.append(f"{alias}lifecycle = ?")
        params.append(lifecycle)
    wanted = sorted(set(tags))
    if wanted:
        marks = ",".join("?" * len(wanted))
        clauses.append(
            f"{alias}id IN (SELECT machine_id FROM machine_tags WHERE tag IN ({marks}) "
            "GROUP BY machine_id HAVING COUNT(DISTINCT tag) = ?)"
        )
        params.extend(wanted)
        params.append(len(wanted))
    where = " WHERE " + " AND ".join(clauses) if clauses else ""
    return where, params


def _tags_by_machine(
    conn: Connection, where: str, params: Sequence[object]
) -> dict[str, dict[str, list[str]]]:
    sql = "SELECT machine_id, tag, source FROM machine_tags"
    if where:
        sql += f" WHERE machine_id IN (SELECT id FROM machines{where})"
    out: dict[str, dict[str, list[str]]] = defaultdict(lambda: {"agent": [], "operator": []})
    for machine_id, tag, source in conn.execute(sql + " ORDER BY machine_id, tag", params):
        out[machine_id][source].append(tag)
    return out


def _machine(row: Row, tags: dict[str, list[str]] | None) -> Machine:
    agent = tuple(tags["agent"]) if tags else ()
    operator = tuple(tags["operator"]) if tags else ()
    success = row["last_success"]
    return Machine(
        id=row["id"],
        lifecycle=Lifecycle(row["lifecycle"]),
        registered_at=parse_time(row["registered_at"]),  # type: ignore[arg-type]
        tags=tuple(sorted(set(agent) | set(operator))),
        agent_tags=agent,
        operator_tags=operator,
        current_generation=row["current_generation"],
        desired_generation=row["desired_generation"],
        desired_cache_url=row["desired_cache_url"],
        desired_source=row["desired_source"],
        last_report_at=parse_time(row["last_report_at"]),
        agent_version=row["agent_version"],
        system_state=SystemState(row["system_state"]),
        last_success=None if success is None else bool(success),
        last_message=row["last_message"],
        failed_generation=row["failed_generation"],
        health=health_from_stored(row["health_json"]),
        retry_requested_at=parse_time(row["retry_requested_at"]),
        uptime_seconds=row["uptime_seconds"],
        needs_reboot=None if row["needs_reboot"] is None else bool(row["needs_reboot"]),
        booted_generation=row["booted_generation"],
    )


def list_machines(
    conn: Connection, tags: Sequence[str] = (), lifecycle: str | None = None
) -> list[Machine]:
    where, params = _filter_sql(tags, lifecycle)
    tag_map = _tags_by_machine(conn, where, params)
    rows = conn.execute(f"SELECT {COLUMNS} FROM machines{where} ORDER BY id", params)
    return [_machine(row, tag_map.get(row["id"])) for row in rows]


def machine_ids(
    conn: Connection, tags: Sequence[str] = (), lifecycle: str | None = None
) -> list[str]:
    where, params = _filter_sql(tags, lifecycle)
    return [r[0] for r in conn.execute(f"SELECT id FROM machines{where} ORDER BY id", params)]


def get(conn: Connection, machine_id: str) -> Machine:
    row = conn.execute(f"SELECT {COLUMNS} FROM machines WHERE id = ?", (machine_id,)).fetchone()
    if row is None:
        raise NotFoundError(
            f"machine {machine_id!r} is not registered; see `nixfleet machines list`"
        )
    where, params = " WHERE id = ?", [machine_id]
    machine = _machine(row, _tags_by_machine(conn, where, params).get(machine_id))
    output = conn.execute(
        "SELECT failed_output FROM machines WHERE id = ?", (machine_id,)
    ).fetchone()[0]
    return machine if output is None else replace(machine, failed_output=output)


def find_lifecycle(conn: Connection, machine_id: str) -> Lifecycle | None:
    """The machine's lifecycle; None when it is not registered."""
    row = conn.execute("SELECT lifecycle FROM machines WHERE id = ?", (machine_id,)).fetchone()
    return None if row is None else Lifecycle(row[0])


def _lifecycle(conn: Connection, machine_id: str) -> Lifecycle:
    lifecycle = find_lifecycle(conn, machine_id)
    if lifecycle is None:
        raise NotFoundError(
            f"machine {machine_id!r} is not registered; see `nixfleet machines list`"
        )
    return lifecycle


def register(
    conn: Connection,
    machine_id: str,
    tags: Iterable[str],
    lifecycle: Lifecycle,
    now: datetime,
) -> None:
    # The unique key decides, not a read before the insert: on PostgreSQL a second
    # transaction registering the same id waits for the first and then inserts nothing
    # (a check first would let both pass it, and the second fail on the key).
    if not conn.execute(
        "INSERT INTO machines (id, lifecycle, registered_at) VALUES (?, ?, ?) "
        "ON CONFLICT (id) DO NOTHING RETURNING id",
        (machine_id, lifecycle.value, isoformat(now)),
    ).fetchall():
        raise ConflictError(
            f"machine {machine_id!r} is already registered; use `nixfleet machines tag` or "
            "`set-lifecycle` to change it"
        )
    report_cache.note_machine(conn, machine_id)  # a new machine (api.status_view's order)
    set_tags(conn, machine_id, tags, "operator", replace=False)


def set_lifecycle(
    conn: Connection,
    machine_id: str,
    target: Lifecycle,
    actor: str = "operator",
    now: datetime | None = None,
) -> Lifecycle:
    """Apply a checked transition and record it; return the previous state.

    The state a machine is already in is a no-op (DESIGN §3): nothing is written, so
    scripts can repeat it.
    """
    current = _lifecycle(conn, machine_id)
    if current is target:
        return current
    check_transition(machine_id, current, target)
    conn.execute("UPDATE machines SET lifecycle = ? WHERE id = ?", (target.value, machine_id))
    event = changes.Event(
        machine_id,
        now or utcnow(),
        changes.EventKind.LIFECYCLE,
        actor,
        detail={"from": current.value, "to": target.value},
    )
    history.add(conn, [event])
    return current


def set_tags(
    conn: Connection,
    machine_id: str,
    tags: Iterable[str],
    source: str,
    *,
    replace: bool,
    have: set[str] | None = None,
) -> tuple[list[str], list[str]]:
    """Add tags of one source; with replace, the given set becomes that source's set.

    Writes only the difference: an agent reports the same tags on every poll, so the
    usual case is one indexed read and no write (no dirty pages for the commit).
    `have`: that source's tags as read in this transaction (saves the read).
    Returns the tags added and removed (for the machine's history).
    """
    wanted = set(tags)
    if have is None:
        have = {
            r[0]
            for r in conn.execute(
                "SELECT tag FROM machine_tags WHERE machine_id = ? AND source = ?",
                (machine_id, source),
            )
        }
    kept = wanted if replace else have | wanted
    if len(kept) > MAX_TAGS_PER_SOURCE:
        raise ValidationError(
            f"machine {machine_id} would have {len(kept)} {source} tags",
            errors=[FieldError("tags", f"at most {MAX_TAGS_PER_SOURCE} {source} tags per machine")],
        )
    removed = sorted(have - wanted) if replace else []
    added = sorted(wanted - have)
    code = TAG_SOURCES[source]
    if removed:
        conn.executemany(_DELETE_TAG, [(machine_id, t, code) for t in removed])
    if added:
        conn.executemany(
            "INSERT INTO machine_tag_rows (machine, tag, source) SELECT num, ?, ? "
            "FROM machine_numbers WHERE machine_id = ? ON CONFLICT DO NOTHING"
            if is_postgresql(conn)
            else "INSERT OR IGNORE INTO machine_tag_rows (machine, tag, source) "
            "SELECT num, ?, ? FROM machine_numbers WHERE machine_id = ?",
            [(t, code, machine_id) for t in added],
        )
    return added, removed


def remove_tags(conn: Connection, machine_id: str, tags: Iterable[str]) -> list[str]:
    """Remove operator tags; return those that were there."""
    _lifecycle(conn, machine_id)
    removed = []
    for t in sorted(set(tags)):
        cur = conn.execute(_DELETE_TAG, (machine_id, t, TAG_SOURCES["operator"]))
        if cur.rowcount:
            removed.append(t)
    return removed


def set_desired(
    conn: Connection,
    machine_id: str,
    store_path: str | None,
    cache_url: str | None,
    source: str | None,
    now: datetime,
    actor: str | None = None,
) -> None:
    """An operator's desired generation (None clears it), with its history event.

    The event's source is `actor` (who asked), else the desired source or "operator".
    """
    _lifecycle(conn, machine_id)
    history.add_desired(
        conn,
        "SELECT id AS machine_id, ? AS at, ? AS source, ? AS generation FROM machines "
        "WHERE id = ? AND desired_generation IS DISTINCT FROM ?",
        (isoformat(now), actor or source or "operator", store_path, machine_id, store_path),
    )
    conn.execute(
        "UPDATE machines SET desired_generation = ?, desired_cache_url = ?, "
        "desired_source = ?, desired_set_at = ? WHERE id = ?",
        (store_path, cache_url, source, isoformat(now), machine_id),
    )
    report_cache.note_machine(conn, machine_id)  # no trigger on desired (migration 0014)


def request_retry(conn: Connection, machine_id: str, now: datetime) -> None:
    _lifecycle(conn, machine_id)
    conn.execute(
        "UPDATE machines SET retry_requested_at = ?, failed_generation = NULL, "
        "failed_output = NULL WHERE id = ?",
        (isoformat(now), machine_id),
    )


# The report's one read: the machine's row, its running rollout's answer fields, and
# what the rest of the transaction needs (built once: it is the hot path).
_REPORT_ROW_TEMPLATE = (
    "SELECT lifecycle, desired_generation, desired_cache_url, desired_source, "
    "retry_requested_at, current_generation, failed_generation, last_success, "
    "health_json, needs_reboot, booted_generation, "
    "(SELECT r.poll_hint FROM rollout_machines rm JOIN rollouts r ON r.id = rm.rollout_id "
    "WHERE rm.machine_id = machines.id "
    "AND r.status = 'running' LIMIT 1) AS poll_hint, (SELECT r.confirm_timeout "
    "FROM rollout_machines rm JOIN rollouts r ON r.id = rm.rollout_id "
    "WHERE rm.machine_id = machines.id AND r.status = 'running' LIMIT 1) "
    "AS confirm_timeout, CASE WHEN ? THEN "
    "(SELECT r.reboot FROM rollout_machines rm JOIN rollouts r ON r.id = rm.rollout_id "
    "WHERE rm.machine_id = machines.id AND r.status = 'running' AND r.reboot = 'when-needed' "
    "LIMIT 1) END AS reboot, "
    # What the rest of the transaction needs, in this one row (each SQLite call
    # hands the GIL to another thread under load): the agent's tags, and the
    # machine's history number and newest events.
    "({agent_tags} FROM machine_tags WHERE machine_id = machines.id "
    "AND source = 'agent') AS agent_tags, "
    f"{history.NUMBER_SQL.format(machine_id='machines.id')} AS num, "
    "{window} AS window "
    "FROM machines WHERE id = ?"
)
_REPORT_ROW = _REPORT_ROW_TEMPLATE.format(
    agent_tags="SELECT json_group_array(tag)",
    window=history.WINDOW_SQL.format(machine_id="machines.id"),
)
# On PostgreSQL the read locks the machine's row (as history.lock_machines would), so
# that the UPDATE's statement, which starts after the lock is taken, reads the
# newest events in its RETURNING: a window read with the row could miss the events
# of a transaction this one waited for (READ COMMITTED re-reads only the locked row).
_REPORT_ROW_PG = (
    _REPORT_ROW_TEMPLATE.format(
        agent_tags="SELECT coalesce(json_agg(tag)::text, '[]')", window="NULL"
    )
    + " FOR NO KEY UPDATE OF machines"
)
# One spelling for both backends: SQLite 3.39+ has IS DISTINCT FROM, and a
# parameter only tested for NULL is given its type for PostgreSQL.
_REPORT_UPDATE = (
    "UPDATE machines SET current_generation = :current, last_report_at = :at, "
    "agent_version = COALESCE(:version, agent_version), system_state = :state, "
    "last_success = :success, last_message = :message, health_json = :health, "
    "health = :health_axis, "
    "uptime_seconds = :uptime, "
    "needs_reboot = :needs_reboot, booted_generation = COALESCE(:booted, booted_generation), "
    # The switch output stays with its failure: replaced by a new failure's (or
    # dropped when it came without), cleared with the failure, else kept (agents
    # send it once).
    "failed_output = CASE WHEN CAST(:failed AS TEXT) IS NOT NULL "
    "  AND CAST(:failed AS TEXT) IS DISTINCT FROM failed_generation THEN :output "
    "  WHEN CAST(:failed AS TEXT) IS NOT NULL AND CAST(:output AS TEXT) IS NOT NULL "
    "  THEN :output WHEN failed_generation = :current THEN NULL ELSE failed_output END, "
    "failed_generation = CASE WHEN CAST(:failed AS TEXT) IS NOT NULL THEN :failed "
    "  WHEN failed_generation = :current THEN NULL ELSE failed_generation END, "
    "lifecycle = CASE WHEN lifecycle IN ('pending', 'provisioning') THEN 'active' "
    "  ELSE lifecycle END "
    "WHERE id = :id"
)
_REPORT_UPDATE_PG = (
    f"{_REPORT_UPDATE} RETURNING {history.WINDOW_SQL_PG.format(machine_id='machines.id')} AS window"
)


def record_report(conn: Connection, report: Report) -> tuple[Row, Lifecycle | None]:
    """Store one agent report: the hot path, a handful of indexed statements.

    What it changes is judged against the row as it was (nixfleet.history) and
    written as events; a heartbeat writes the machine row only. Returns the
    machine's desired-generation row and, when the report moved the machine out of
    pending/provisioning, the state it left.
    """
    # The poll hint is the running rollout's (store.rollouts.set_poll_hint), found
    # through rollout_machines_machine; a machine is in at most one active rollout.
    # Its reboot policy (DESIGN §11) is looked up only when the agent needs a reboot.
    pg = is_postgresql(conn)
    row = conn.execute(
        _REPORT_ROW_PG if pg else _REPORT_ROW,
        (bool(report.needs_reboot), report.machine_id),
    ).fetchone()
    if row is None:
        raise NotFoundError(
            f"machine {report.machine_id!r} is not registered; register it or enroll the agent"
        )
    lifecycle = Lifecycle(row["lifecycle"])
    if lifecycle is Lifecycle.DECOMMISSIONED:
        raise GoneError(
            f"machine {report.machine_id!r} is decommissioned; its reports are refused. "
            "Stop its agent, or register it again under a new id"
        )
    promoted = lifecycle if lifecycle in (Lifecycle.PENDING, Lifecycle.PROVISIONING) else None
    health = health_to_stored(report.health) if report.health is not None else None
    at = isoformat(report.received_at)
    failed = None if report.success else report.attempted_generation
    values = {
        "current": report.current_generation,
        "at": at,
        "version": report.agent_version,
        "state": report.system_state.value,
        "success": int(report.success),
        "message": report.message,
        "health": health,
        "health_axis": health_of(report.health).value,
        "uptime": report.uptime_seconds,
        "failed": failed,
        "output": report.output if failed is not None else None,
        "needs_reboot": None if report.needs_reboot is None else int(report.needs_reboot),
        "booted": report.booted_generation,
        "id": report.machine_id,
    }
    if pg:  # the newest events, read under the row lock (_REPORT_ROW_PG)
        window = conn.execute(_REPORT_UPDATE_PG, values).fetchone()["window"]
    else:
        conn.execute(_REPORT_UPDATE, values)
        window = row["window"]
    prior = changes.Prior(
        current_generation=row["current_generation"],
        failed_generation=row["failed_generation"],
        last_success=None if row["last_success"] is None else bool(row["last_success"]),
        health=health_from_stored(row["health_json"]),
        needs_reboot=None if row["needs_reboot"] is None else bool(row["needs_reboot"]),
        booted_generation=row["booted_generation"],
    )
    events: list[changes.Event] = []
    if promoted is not None:
        detail = {"from": promoted.value, "to": "active", "reason": "first agent report"}
        events.append(
            changes.Event(
                report.machine_id,
                report.received_at,
                changes.EventKind.LIFECYCLE,
                "agent",
                detail=detail,
            )
        )
    events += changes.report_events(prior, report)
    if report.tags is not None:
        have = set(json.loads(row["agent_tags"]))
        added, removed = set_tags(
            conn, report.machine_id, report.tags, "agent", replace=True, have=have
        )
        tags = history.tags_event(
            report.machine_id, report.received_at, "agent", "agent", added, removed
        )
        if tags is not None:
            events.append(tags)
    if events:
        known = (
            {report.machine_id: (int(row["num"]), history.window_of(window))}
            if row["num"] is not None
            else None
        )
        history.add(conn, events, known, locked=pg)
    return row, promoted


def count(conn: Connection) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM machines").fetchone()[0])


def list_filtered(
    conn: Connection, f: MachineFilter, now: datetime, stale_after: int
) -> list[Machine]:
    """The machines f selects, in f's order (GET /api/v1/machines)."""
    cutoff = isoformat(stale_cutoff(now, stale_after))
    pred, params = filter_sql(f, cutoff, postgresql=is_postgresql(conn))
    where = f" WHERE {pred}" if pred else ""
    sub = f" WHERE machine_id IN (SELECT m.id FROM machines m{where})" if pred else ""
    tag_map: dict[str, dict[str, list[str]]] = defaultdict(lambda: {"agent": [], "operator": []})
    for machine_id, tag, source in conn.execute(
        f"SELECT machine_id, tag, source FROM machine_tags{sub} ORDER BY machine_id, tag", params
    ):
        tag_map[machine_id][source].append(tag)
    rows = conn.execute(f"SELECT {COLUMNS} FROM machines m{where} ORDER BY {order_sql(f)}", params)
    return [_machine(row, tag_map.get(row["id"])) for row in rows]
