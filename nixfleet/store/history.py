"""Machine history (DESIGN §3 History): events written where they happen, pruned apart.

One row per change. A generation or desired event stores only the generation it
moved *to*; where it came from is the one before it of the same kind, found by a
window function on read, so a deployment stores each store path twice (desired,
then current) rather than four times. Desired-generation events are written by
`add_desired`, which every writer of machines.desired_generation runs over the rows
it changes (an operator's set/clear, a rollout's batch start and its revert), set-based,
in the writer's transaction; tests/store/test_history.py checks that no other
statement writes that column.

Pruning (age, per-machine cap) runs in the background job in short transactions,
never on the report path.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from nixfleet.history import CHAINED, Event, EventKind
from nixfleet.models import isoformat, parse_time

MAX_PAGE = 1000

_INSERT = (
    "INSERT INTO machine_events (machine_id, at, kind, source, generation, detail_json) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)


def add(conn: sqlite3.Connection, events: Iterable[Event]) -> None:
    rows = [
        (
            e.machine_id,
            isoformat(e.at),
            e.kind.value,
            e.source,
            e.generation,
            json.dumps(dict(e.detail), separators=(",", ":")) if e.detail else None,
        )
        for e in events
    ]
    if rows:
        conn.executemany(_INSERT, rows)


def tags_changed(
    conn: sqlite3.Connection,
    machine_id: str,
    at: datetime,
    source: str,
    tag_source: str,
    added: Sequence[str],
    removed: Sequence[str],
) -> None:
    """One tags event for what actually changed (nothing when nothing did)."""
    if not added and not removed:
        return
    detail = {"tag_source": tag_source, "added": sorted(added), "removed": sorted(removed)}
    add(conn, [Event(machine_id, at, EventKind.TAGS, source, detail=detail)])


def add_desired(conn: sqlite3.Connection, rows: str, params: Sequence[object]) -> int:
    """A desired event for each row of `rows`: (machine_id, at, source, generation).

    `rows` is a SELECT over exactly the machines the caller's next UPDATE changes
    (the old desired generation IS NOT the new one), run before it in the same
    transaction, so one statement writes a whole chunk's events. Returns how many.
    """
    return conn.execute(
        "INSERT INTO machine_events (machine_id, at, kind, source, generation) "
        f"SELECT machine_id, at, 'desired', source, generation FROM ({rows})",
        params,
    ).rowcount


@dataclass(frozen=True)
class Page:
    events: list[Event]
    next_after: int | None  # pass as `after` for the next page; None: this was the last


_CHAINED_SQL = ", ".join(f"'{k.value}'" for k in sorted(CHAINED))


def _select(where: str) -> str:
    return (
        "SELECT * FROM (SELECT id, machine_id, at, kind, source, generation, detail_json, "
        f"CASE WHEN kind IN ({_CHAINED_SQL}) THEN lag(generation) OVER w END AS previous "
        "FROM machine_events WHERE machine_id = ? WINDOW w AS (PARTITION BY kind ORDER BY id)) "
        f"{where}"
    )


def _event(row: sqlite3.Row) -> Event:
    detail = row["detail_json"]
    return Event(
        machine_id=row["machine_id"],
        at=parse_time(row["at"]),  # type: ignore[arg-type]
        kind=EventKind(row["kind"]),
        source=row["source"],
        generation=row["generation"],
        previous=row["previous"],
        detail=json.loads(detail) if detail else {},
        id=row["id"],
    )


def page(
    conn: sqlite3.Connection,
    machine_id: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    kinds: Sequence[EventKind] = (),
    after: int = 0,
    limit: int = 100,
) -> Page:
    """Events oldest first, from after `after` (an event id), at most `limit` of them."""
    clauses = ["id > ?"]
    params: list[object] = [machine_id, after]
    if since is not None:
        clauses.append("at >= ?")
        params.append(isoformat(since))
    if until is not None:
        clauses.append("at < ?")
        params.append(isoformat(until))
    if kinds:
        clauses.append(f"kind IN ({','.join('?' * len(kinds))})")
        params.extend(k.value for k in kinds)
    sql = _select("WHERE " + " AND ".join(clauses) + " ORDER BY id LIMIT ?")
    rows = conn.execute(sql, (*params, limit + 1)).fetchall()
    events = [_event(r) for r in rows[:limit]]
    return Page(events, events[-1].id if len(rows) > limit else None)


def latest(conn: sqlite3.Connection, machine_id: str, n: int) -> list[Event]:
    """The newest n events, oldest first (what `machines show` ends with)."""
    rows = conn.execute(_select("ORDER BY id DESC LIMIT ?"), (machine_id, n)).fetchall()
    return [_event(r) for r in reversed(rows)]


# --- pruning (the background job; each call is one short transaction) -----------------


def prune_age(conn: sqlite3.Connection, cutoff: datetime, chunk: int) -> int:
    """Delete events older than cutoff among the `chunk` oldest ids; return how many.

    Ids grow with time, so the oldest events are the lowest ids and no index on the
    time is needed; the caller repeats while a whole chunk went.
    """
    cur = conn.execute(
        "DELETE FROM machine_events WHERE id IN "
        "(SELECT id FROM machine_events ORDER BY id LIMIT ?) AND at < ?",
        (chunk, isoformat(cutoff)),
    )
    return cur.rowcount


def prune_cap(
    conn: sqlite3.Connection, cap: int, after_machine: str, machines: int
) -> tuple[int, str | None]:
    """Keep the newest `cap` events of the next `machines` machines after `after_machine`.

    Returns how many events went and the last machine id covered (None: no more).
    """
    last = conn.execute(
        "SELECT max(id) FROM (SELECT id FROM machines WHERE id > ? ORDER BY id LIMIT ?)",
        (after_machine, machines),
    ).fetchone()[0]
    if last is None:
        return 0, None
    cur = conn.execute(
        "DELETE FROM machine_events WHERE id IN (SELECT e.id FROM (SELECT m.id AS mid, "
        "(SELECT x.id FROM machine_events x WHERE x.machine_id = m.id "
        "ORDER BY x.id DESC LIMIT 1 OFFSET ?) AS edge FROM machines m "
        "WHERE m.id > ? AND m.id <= ?) t "
        "JOIN machine_events e ON e.machine_id = t.mid AND e.id <= t.edge)",
        (cap, after_machine, last),
    )
    return cur.rowcount, last


def count(conn: sqlite3.Connection, machine_id: str | None = None) -> int:
    if machine_id is None:
        return int(conn.execute("SELECT count(*) FROM machine_events").fetchone()[0])
    row = conn.execute("SELECT count(*) FROM machine_events WHERE machine_id = ?", (machine_id,))
    return int(row.fetchone()[0])
