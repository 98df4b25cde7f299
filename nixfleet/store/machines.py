"""Machines, their tags and desired generations.

Reads are set-based: a listing is two queries (machines, then their tags), whatever
the fleet size. Writes take the connection of an open transaction from the caller,
so one API request is one transaction.
"""

from __future__ import annotations

import json
import sqlite3
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from nixfleet import history as changes
from nixfleet.errors import ConflictError, FieldError, GoneError, NotFoundError, ValidationError
from nixfleet.filters import MachineFilter
from nixfleet.models import (
    Health,
    HealthResult,
    Lifecycle,
    Machine,
    Report,
    Sync,
    SystemState,
    check_transition,
    counts_in_sync_summary,
    isoformat,
    parse_time,
    stale_cutoff,
    utcnow,
)
from nixfleet.store import history, report_cache

MAX_TAGS_PER_SOURCE = 64  # as the tags schema's maxItems: one request cannot add more

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
    conn: sqlite3.Connection, where: str, params: Sequence[object]
) -> dict[str, dict[str, list[str]]]:
    sql = "SELECT machine_id, tag, source FROM machine_tags"
    if where:
        sql += f" WHERE machine_id IN (SELECT id FROM machines{where})"
    out: dict[str, dict[str, list[str]]] = defaultdict(lambda: {"agent": [], "operator": []})
    for machine_id, tag, source in conn.execute(sql + " ORDER BY machine_id, tag", params):
        out[machine_id][source].append(tag)
    return out


def _machine(row: sqlite3.Row, tags: dict[str, list[str]] | None) -> Machine:
    agent = tuple(tags["agent"]) if tags else ()
    operator = tuple(tags["operator"]) if tags else ()
    health = row["health_json"]
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
        health=HealthResult.from_dict(json.loads(health)) if health else None,
        retry_requested_at=parse_time(row["retry_requested_at"]),
        uptime_seconds=row["uptime_seconds"],
        needs_reboot=None if row["needs_reboot"] is None else bool(row["needs_reboot"]),
        booted_generation=row["booted_generation"],
    )


def list_machines(
    conn: sqlite3.Connection, tags: Sequence[str] = (), lifecycle: str | None = None
) -> list[Machine]:
    where, params = _filter_sql(tags, lifecycle)
    tag_map = _tags_by_machine(conn, where, params)
    rows = conn.execute(f"SELECT {COLUMNS} FROM machines{where} ORDER BY id", params)
    return [_machine(row, tag_map.get(row["id"])) for row in rows]


def machine_ids(
    conn: sqlite3.Connection, tags: Sequence[str] = (), lifecycle: str | None = None
) -> list[str]:
    where, params = _filter_sql(tags, lifecycle)
    return [r[0] for r in conn.execute(f"SELECT id FROM machines{where} ORDER BY id", params)]


def get(conn: sqlite3.Connection, machine_id: str) -> Machine:
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


def find_lifecycle(conn: sqlite3.Connection, machine_id: str) -> Lifecycle | None:
    """The machine's lifecycle; None when it is not registered."""
    row = conn.execute("SELECT lifecycle FROM machines WHERE id = ?", (machine_id,)).fetchone()
    return None if row is None else Lifecycle(row[0])


def _lifecycle(conn: sqlite3.Connection, machine_id: str) -> Lifecycle:
    lifecycle = find_lifecycle(conn, machine_id)
    if lifecycle is None:
        raise NotFoundError(
            f"machine {machine_id!r} is not registered; see `nixfleet machines list`"
        )
    return lifecycle


def register(
    conn: sqlite3.Connection,
    machine_id: str,
    tags: Iterable[str],
    lifecycle: Lifecycle,
    now: datetime,
) -> None:
    if conn.execute("SELECT 1 FROM machines WHERE id = ?", (machine_id,)).fetchone():
        raise ConflictError(
            f"machine {machine_id!r} is already registered; use `nixfleet machines tag` or "
            "`set-lifecycle` to change it"
        )
    conn.execute(
        "INSERT INTO machines (id, lifecycle, registered_at) VALUES (?, ?, ?)",
        (machine_id, lifecycle.value, isoformat(now)),
    )
    set_tags(conn, machine_id, tags, "operator", replace=False)


def set_lifecycle(
    conn: sqlite3.Connection,
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
    conn: sqlite3.Connection,
    machine_id: str,
    tags: Iterable[str],
    source: str,
    *,
    replace: bool,
) -> tuple[list[str], list[str]]:
    """Add tags of one source; with replace, the given set becomes that source's set.

    Writes only the difference: an agent reports the same tags on every poll, so the
    usual case is one indexed read and no write (no dirty pages for the commit).
    Returns the tags added and removed (for the machine's history).
    """
    wanted = set(tags)
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
    if removed:
        conn.executemany(
            "DELETE FROM machine_tags WHERE machine_id = ? AND tag = ? AND source = ?",
            [(machine_id, t, source) for t in removed],
        )
    if added:
        conn.executemany(
            "INSERT OR IGNORE INTO machine_tags (machine_id, tag, source) VALUES (?, ?, ?)",
            [(machine_id, t, source) for t in added],
        )
    return added, removed


def remove_tags(conn: sqlite3.Connection, machine_id: str, tags: Iterable[str]) -> list[str]:
    """Remove operator tags; return those that were there."""
    _lifecycle(conn, machine_id)
    removed = []
    for t in sorted(set(tags)):
        cur = conn.execute(
            "DELETE FROM machine_tags WHERE machine_id = ? AND tag = ? AND source = 'operator'",
            (machine_id, t),
        )
        if cur.rowcount:
            removed.append(t)
    return removed


def set_desired(
    conn: sqlite3.Connection,
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
        "WHERE id = ? AND desired_generation IS NOT ?",
        (isoformat(now), actor or source or "operator", store_path, machine_id, store_path),
    )
    conn.execute(
        "UPDATE machines SET desired_generation = ?, desired_cache_url = ?, "
        "desired_source = ?, desired_set_at = ? WHERE id = ?",
        (store_path, cache_url, source, isoformat(now), machine_id),
    )
    report_cache.note_machine(conn, machine_id)  # no trigger on desired (migration 0014)


def request_retry(conn: sqlite3.Connection, machine_id: str, now: datetime) -> None:
    _lifecycle(conn, machine_id)
    conn.execute(
        "UPDATE machines SET retry_requested_at = ?, failed_generation = NULL, "
        "failed_output = NULL WHERE id = ?",
        (isoformat(now), machine_id),
    )


def record_report(conn: sqlite3.Connection, report: Report) -> tuple[sqlite3.Row, Lifecycle | None]:
    """Store one agent report: the hot path, a handful of indexed statements.

    What it changes is judged against the row as it was (nixfleet.history) and
    written as events; a heartbeat writes the machine row only. Returns the
    machine's desired-generation row and, when the report moved the machine out of
    pending/provisioning, the state it left.
    """
    # The poll hint is the running rollout's (store.rollouts.set_poll_hint), found
    # through rollout_machines_machine; a machine is in at most one active rollout.
    # Its reboot policy (DESIGN §11) is looked up only when the agent needs a reboot.
    row = conn.execute(
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
        "LIMIT 1) END AS reboot "
        "FROM machines WHERE id = ?",
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
    health = json.dumps(report.health.to_dict()) if report.health is not None else None
    at = isoformat(report.received_at)
    failed = None if report.success else report.attempted_generation
    conn.execute(
        "UPDATE machines SET current_generation = :current, last_report_at = :at, "
        "agent_version = COALESCE(:version, agent_version), system_state = :state, "
        "last_success = :success, last_message = :message, health_json = :health, "
        "uptime_seconds = :uptime, "
        "needs_reboot = :needs_reboot, booted_generation = COALESCE(:booted, booted_generation), "
        # The switch output stays with its failure: replaced by a new failure's (or
        # dropped when it came without), cleared with the failure, else kept (agents
        # send it once).
        "failed_output = CASE WHEN :failed IS NOT NULL AND :failed IS NOT failed_generation "
        "  THEN :output WHEN :failed IS NOT NULL AND :output IS NOT NULL THEN :output "
        "  WHEN failed_generation = :current THEN NULL ELSE failed_output END, "
        "failed_generation = CASE WHEN :failed IS NOT NULL THEN :failed "
        "  WHEN failed_generation = :current THEN NULL ELSE failed_generation END, "
        "lifecycle = CASE WHEN lifecycle IN ('pending', 'provisioning') THEN 'active' "
        "  ELSE lifecycle END "
        "WHERE id = :id",
        {
            "current": report.current_generation,
            "at": at,
            "version": report.agent_version,
            "state": report.system_state.value,
            "success": int(report.success),
            "message": report.message,
            "health": health,
            "uptime": report.uptime_seconds,
            "failed": failed,
            "output": report.output if failed is not None else None,
            "needs_reboot": None if report.needs_reboot is None else int(report.needs_reboot),
            "booted": report.booted_generation,
            "id": report.machine_id,
        },
    )
    prior = changes.Prior(
        current_generation=row["current_generation"],
        failed_generation=row["failed_generation"],
        last_success=None if row["last_success"] is None else bool(row["last_success"]),
        health_json=row["health_json"],
        needs_reboot=None if row["needs_reboot"] is None else bool(row["needs_reboot"]),
        booted_generation=row["booted_generation"],
    )
    events = []
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
    history.add(conn, events + changes.report_events(prior, report))
    if report.tags is not None:
        added, removed = set_tags(conn, report.machine_id, report.tags, "agent", replace=True)
        history.tags_changed(
            conn, report.machine_id, report.received_at, "agent", "agent", added, removed
        )
    return row, promoted


def count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM machines").fetchone()[0])


# --- fleet status (GET /api/v1/status): JSON straight from SQLite -------------------------

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
        clauses.append(
            "NOT EXISTS (SELECT 1 FROM machine_tags t WHERE t.machine_id = m.id "
            f"AND t.tag IN ({','.join('?' * len(unwanted))}))"
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


def list_filtered(
    conn: sqlite3.Connection, f: MachineFilter, now: datetime, stale_after: int
) -> list[Machine]:
    """The machines f selects, in f's order (GET /api/v1/machines)."""
    pred, params = filter_sql(f, isoformat(stale_cutoff(now, stale_after)))
    where = f" WHERE {pred}" if pred else ""
    sub = f" WHERE machine_id IN (SELECT m.id FROM machines m{where})" if pred else ""
    tag_map: dict[str, dict[str, list[str]]] = defaultdict(lambda: {"agent": [], "operator": []})
    for machine_id, tag, source in conn.execute(
        f"SELECT machine_id, tag, source FROM machine_tags{sub} ORDER BY machine_id, tag", params
    ):
        tag_map[machine_id][source].append(tag)
    rows = conn.execute(f"SELECT {COLUMNS} FROM machines m{where} ORDER BY {order_sql(f)}", params)
    return [_machine(row, tag_map.get(row["id"])) for row in rows]


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
