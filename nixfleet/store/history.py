"""Machine history (DESIGN §3 History): events written where they happen, pruned apart.

Layout (migration 0017; docs/performance.md "Storage" has the sizes). One row of
`machine_events` per change, clustered per machine in a WITHOUT ROWID table keyed
(machine, seq), so a machine's timeline is one contiguous range and nothing else
indexes it:

- `machine`: the machine's number (`machine_numbers`, given by a trigger when the
  machine row is inserted) instead of its id text, repeated per event;
- `seq`: 1, 2, 3 … per machine, the event's order and its `id` in the API;
- `at`: microseconds since 1970 UTC (`micros`; its SQL form `micros_sql`);
- `kind`: a small code (`KIND_CODES`, the rows of `event_kinds`); `source`: an id in
  `event_sources` ("agent" = 1, "operator" = 2, actors and rollout labels after);
- `generation`: the store path, stored without what every path repeats
  (`encode_path`: no "/nix/store/", "-nixos-system-<the machine's name>-" as one byte,
  any other "-nixos-system-" as another; migration 0024), or, where an event
  of the `LOOKBACK` events before it holds the same path, the integer k: "the path of
  the event k before this one" (a switch after its desired event stores 1, which SQLite
  keeps in the record header: no byte at all). The pruning job writes the path back
  into an event whose holder it deletes;
- `detail`: JSON; the usual shapes as an array of values in the kind's key order
  (`DETAIL_KEYS`), anything else as the object itself.

A generation or desired event stores only the generation it moved *to*; where it came
from is the one before it of the same kind, found by a window function on read.
Desired-generation events are written by `add_desired`, which every writer of
machines.desired_generation runs over the rows it changes (an operator's set/clear, a
rollout's batch start and its revert), set-based, in the writer's transaction;
tests/store/test_history.py checks that no other statement writes that column.
`machine_history` is a view of the same rows in readable form (for sqlite3 by hand;
held to `page` by tests).

Pruning (age, per-machine cap) runs in the background job in short transactions,
never on the report path.

On PostgreSQL (`is_postgresql`) `generation` is two columns: the path in `generation`,
k in `generation_back` (sql/postgresql/0004_baseline.sql); the SQL that differs is
spelled twice below, each PostgreSQL spelling beside SQLite's (suffix `_PG`). SQLite's
one writer keeps "read the newest seq, append after it" whole; on PostgreSQL `add`,
`add_desired` and `prune` lock the machines' rows first (`lock_machines`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from nixfleet.history import CHAINED, Event, EventKind
from nixfleet.store.conn import Connection, Row, is_postgresql
from nixfleet.store.event_forms import (
    AGENT,
    KIND_CODES,
    KINDS,
    OPERATOR,
    decode_detail,
    decode_path,
    encode_detail,
    encode_path,
    encode_path_sql,
    from_micros,
    micros,
    micros_sql,
)

MAX_PAGE = 1000
LOOKBACK = 8  # how far back an event may find the event holding its path

# --- writing ------------------------------------------------------------------------------

_INSERT_MANY = (
    "INSERT INTO machine_events (machine, seq, at, kind, source, generation, detail) VALUES "
)
_INSERT_MANY_PG = (
    "INSERT INTO machine_events (machine, seq, at, kind, source, generation, generation_back, "
    "detail) VALUES "
)


def source_id(conn: Connection, name: str) -> int:
    """The id of a source name in event_sources, added on first use."""
    if name == "agent":
        return AGENT
    if name == "operator":
        return OPERATOR
    if is_postgresql(conn):
        conn.execute("INSERT INTO event_sources (name) VALUES (?) ON CONFLICT DO NOTHING", (name,))
    else:
        conn.execute("INSERT OR IGNORE INTO event_sources (name) VALUES (?)", (name,))
    return int(conn.execute("SELECT id FROM event_sources WHERE name = ?", (name,)).fetchone()[0])


def _number(conn: Connection, machine_id: str) -> int:
    row = conn.execute("SELECT num FROM machine_numbers WHERE machine_id = ?", (machine_id,))
    found = row.fetchone()
    if found is None:
        raise LookupError(f"machine {machine_id!r} has no number (not registered?)")
    return int(found[0])


# The newest LOOKBACK events of a machine, newest first: (seq, stored generation).
Window = list[tuple[int, object]]

# SQL: the machine's number and its window as JSON ([[seq, generation], …]), for the
# machine whose id is the expression `machine_id` (a report reads both with its row).
NUMBER_SQL = "(SELECT num FROM machine_numbers WHERE machine_id = {machine_id})"
_WINDOW_ROWS = (
    f"FROM (SELECT seq, generation FROM machine_events WHERE machine = {NUMBER_SQL} "
    f"ORDER BY seq DESC LIMIT {LOOKBACK}) w)"
)
WINDOW_SQL = "(SELECT json_group_array(json_array(w.seq, w.generation)) " + _WINDOW_ROWS
# PostgreSQL's spelling (a back reference's generation is NULL there: generation_back).
WINDOW_SQL_PG = "(SELECT json_agg(json_build_array(w.seq, w.generation))::text " + _WINDOW_ROWS


def window_of(text: str | None) -> Window:
    """WINDOW_SQL's JSON as a Window (newest first)."""
    rows = json.loads(text) if text else []
    return sorted(((int(seq), gen) for seq, gen in rows), key=lambda r: -r[0])


def add(
    conn: Connection,
    events: Iterable[Event],
    known: Mapping[str, tuple[int, Window]] | None = None,
    *,
    locked: bool = False,
) -> None:
    """Append events in order (each machine's after its newest), in one INSERT.

    `known`: per machine, its number and window as read in this transaction
    (NUMBER_SQL, WINDOW_SQL), which saves reading them again. On PostgreSQL the
    machines' rows are locked first (`lock_machines`) and the windows read after the
    lock; with `known` the caller holds that lock already, and `locked` says it read
    the windows after taking it, in a later statement (record_report); without
    `locked` only the numbers are taken from `known`.
    """
    by_machine: dict[str, list[Event]] = {}
    for e in events:
        by_machine.setdefault(e.machine_id, []).append(e)
    if is_postgresql(conn) and not (
        locked and known is not None and known.keys() >= by_machine.keys()
    ):
        known = _windows_pg(conn, list(by_machine), known)
    rows: list[object] = []
    for machine_id, mine in by_machine.items():
        found = known.get(machine_id) if known is not None else None
        if found is not None:
            num, window = found
        else:
            num = _number(conn, machine_id)
            # The newest events, newest first: the next seq, and the paths to refer to.
            window = [
                (int(r[0]), r[1])
                for r in conn.execute(
                    "SELECT seq, generation FROM machine_events WHERE machine = ? "
                    "ORDER BY seq DESC LIMIT ?",
                    (num, LOOKBACK),
                )
            ]
        seq = window[0][0] if window else 0
        for e in mine:
            seq += 1
            stored: object = None
            if e.generation is not None:
                stored = encode_path(e.generation, machine_id)
                stored = next((seq - s for s, g in window if g == stored), stored)
            source = source_id(conn, e.source)
            rows.extend(
                (
                    num,
                    seq,
                    micros(e.at),
                    KIND_CODES[e.kind],
                    source,
                    stored,
                    encode_detail(e.kind, e.detail),
                )
            )
            window = [(seq, stored), *window[: LOOKBACK - 1]]
    insert, width, marks = _INSERT_MANY, 7, "(?, ?, ?, ?, ?, ?, ?)"
    if is_postgresql(conn):
        insert, width, marks, rows = _INSERT_MANY_PG, 8, "(?, ?, ?, ?, ?, ?, ?, ?)", _pg_rows(rows)
    # One statement per 500 events (each SQLite call hands the GIL over under load).
    for start in range(0, len(rows), 500 * width):
        chunk = rows[start : start + 500 * width]
        values = ", ".join([marks] * (len(chunk) // width))
        conn.execute(insert + values, chunk)


_LOCK_PG = (
    "SELECT m.id, n.num FROM machines m JOIN machine_numbers n ON n.machine_id = m.id "
    "WHERE {key} = ANY(?) ORDER BY m.id FOR NO KEY UPDATE OF m"
)


def lock_machines(conn: Connection, machine_ids: Sequence[str]) -> dict[str, int]:
    """PostgreSQL: lock the machines' rows, in id order, until the commit; their numbers.

    What every writer of a machine's events holds while it reads its newest seq (and
    the paths to refer to) and appends after it, and the pruning job while it deletes
    what they may refer to: READ COMMITTED lets two transactions read the same newest
    seq, and the second's INSERT would then fail on (machine, seq). The row of
    `machines` because record_report's UPDATE takes it anyway; FOR NO KEY UPDATE
    because it conflicts with itself and the UPDATEs, not with foreign-key checks.
    """
    rows = conn.execute(_LOCK_PG.format(key="m.id"), (list(machine_ids),)).fetchall()
    return {r[0]: int(r[1]) for r in rows}


def _windows_pg(
    conn: Connection, machine_ids: list[str], known: Mapping[str, tuple[int, Window]] | None
) -> dict[str, tuple[int, Window]]:
    """add's numbers and windows on PostgreSQL, read under the machines' row locks."""
    nums = {m: known[m][0] for m in machine_ids if known is not None and m in known}
    if len(nums) < len(machine_ids):
        nums = lock_machines(conn, machine_ids)
        missing = [m for m in machine_ids if m not in nums]
        if missing:
            raise LookupError(f"machine {missing[0]!r} has no number (not registered?)")
    windows: dict[int, Window] = {num: [] for num in nums.values()}
    for num, seq, generation in conn.execute(
        "SELECT n.num, w.seq, w.generation FROM unnest(CAST(? AS INTEGER[])) AS n (num) "
        "CROSS JOIN LATERAL (SELECT seq, generation FROM machine_events e "
        "WHERE e.machine = n.num ORDER BY seq DESC LIMIT ?) w ORDER BY n.num, w.seq DESC",
        (list(nums.values()), LOOKBACK),
    ):
        windows[num].append((int(seq), generation))
    return {m: (num, windows[num]) for m, num in nums.items()}


def _pg_rows(rows: list[object]) -> list[object]:
    """add's rows of 7 values as PostgreSQL's rows of 8: generation split in two."""
    out: list[object] = []
    for i in range(0, len(rows), 7):
        *head, stored, detail = rows[i : i + 7]
        back = stored if isinstance(stored, int) else None
        out.extend((*head, None if back is not None else stored, back, detail))
    return out


def add_desired(conn: Connection, rows: str, params: Sequence[object]) -> int:
    """A desired event for each row of `rows`: (machine_id, at, source, generation).

    `rows` is a SELECT over exactly the machines the caller's next UPDATE changes
    (the old desired generation IS NOT the new one), run before it in the same
    transaction, so one statement writes a whole chunk's events; `at` is a stored
    time text, `source` a name, `generation` a store path or NULL. At most one row
    per machine (each takes its machine's next seq). Returns how many.
    """
    # `rows` is evaluated once, into a temp table: the source names and the events
    # are both read from it (evaluating it twice cost a tick 14-50 ms per 5,000 rows).
    # The table is the connection's own (a pooled one keeps it on PostgreSQL).
    pg = is_postgresql(conn)
    temp = "pg_temp" if pg else "temp"
    conn.execute(
        "CREATE TEMP TABLE IF NOT EXISTS desired_rows "
        "(machine_id TEXT NOT NULL, at TEXT NOT NULL, source TEXT NOT NULL, generation TEXT)"
    )
    if not conn.execute(f"INSERT INTO {temp}.desired_rows {rows}", params).rowcount:
        return 0
    if pg:  # the machines' next seqs are read below: lock them first (lock_machines)
        conn.execute(
            "SELECT 1 FROM machines WHERE id IN (SELECT machine_id FROM pg_temp.desired_rows) "
            "ORDER BY id FOR NO KEY UPDATE"
        )
    conn.execute(  # WHERE true: SQLite would read ON CONFLICT as the SELECT's join
        f"INSERT INTO event_sources (name) SELECT DISTINCT source FROM {temp}.desired_rows "
        "WHERE true ON CONFLICT DO NOTHING"
    )
    written = conn.execute(
        "INSERT INTO machine_events (machine, seq, at, kind, source, generation) "
        "SELECT n.num, coalesce((SELECT max(e.seq) FROM machine_events e "
        f"WHERE e.machine = n.num), 0) + 1, {micros_sql('d.at', postgresql=pg)}, "
        f"{KIND_CODES[EventKind.DESIRED]}, s.id, "
        f"{encode_path_sql('d.generation', 'd.machine_id', postgresql=pg)} "
        f"FROM {temp}.desired_rows AS d JOIN machine_numbers n ON n.machine_id = d.machine_id "
        "JOIN event_sources s ON s.name = d.source"
    ).rowcount
    conn.execute(f"DELETE FROM {temp}.desired_rows")
    return int(written)


def tags_changed(
    conn: Connection,
    machine_id: str,
    at: datetime,
    source: str,
    tag_source: str,
    added: Sequence[str],
    removed: Sequence[str],
) -> None:
    """One tags event for what actually changed (nothing when nothing did)."""
    event = tags_event(machine_id, at, source, tag_source, added, removed)
    if event is not None:
        add(conn, [event])


def tags_event(
    machine_id: str,
    at: datetime,
    source: str,
    tag_source: str,
    added: Sequence[str],
    removed: Sequence[str],
) -> Event | None:
    """tags_changed's event, not yet written (None when nothing changed)."""
    if not added and not removed:
        return None
    detail = {"tag_source": tag_source, "added": sorted(added), "removed": sorted(removed)}
    return Event(machine_id, at, EventKind.TAGS, source, detail=detail)


# --- reading ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Page:
    events: list[Event]
    next_after: int | None  # pass as `after` for the next page; None: this was the last


_CHAINED_SQL = ", ".join(str(KIND_CODES[k]) for k in sorted(CHAINED))


# A row's path: its own, or its holder's (SQLite: an integer generation; PostgreSQL:
# generation_back).
_PATH = (
    "CASE WHEN typeof(e.generation) = 'integer' THEN "
    "(SELECT h.generation FROM machine_events h WHERE h.machine = e.machine "
    "AND h.seq = e.seq - e.generation) ELSE e.generation END"
)
_PATH_PG = (
    "coalesce(e.generation, (SELECT h.generation FROM machine_events h "
    "WHERE h.machine = e.machine AND h.seq = e.seq - e.generation_back))"
)


def _select(where: str, postgresql: bool) -> str:
    # The machine's events with each path resolved (a reference read from its holder),
    # `previous` from the event of the same kind before; then the page's filter.
    # PostgreSQL (before 16) wants an alias for each subquery in FROM.
    path, alias = (_PATH_PG, " p") if postgresql else (_PATH, "")
    return (
        "SELECT r.*, s.name AS source_name FROM (SELECT *, CASE WHEN kind IN "
        f"({_CHAINED_SQL}) THEN lag(path) OVER w END AS previous FROM (SELECT e.seq, e.at, "
        f"e.kind, e.source, e.detail, {path} AS path "
        "FROM machine_events e WHERE e.machine = "
        f"(SELECT num FROM machine_numbers WHERE machine_id = ?)){alias} "
        "WINDOW w AS (PARTITION BY kind ORDER BY seq)) r "
        f"JOIN event_sources s ON s.id = r.source {where}"
    )


def _event(machine_id: str, row: Row) -> Event:
    kind = KINDS[row["kind"]]
    path, previous = row["path"], row["previous"]
    return Event(
        machine_id=machine_id,
        at=from_micros(row["at"]),
        kind=kind,
        source=row["source_name"],
        generation=None if path is None else decode_path(path, machine_id),
        previous=None if previous is None else decode_path(previous, machine_id),
        detail=decode_detail(kind, row["detail"]),
        id=row["seq"],
    )


def page(
    conn: Connection,
    machine_id: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    kinds: Sequence[EventKind] = (),
    after: int = 0,
    limit: int = 100,
) -> Page:
    """Events oldest first, from after `after` (an event id), at most `limit` of them."""
    clauses = ["r.seq > ?"]
    params: list[object] = [machine_id, after]
    if since is not None:
        clauses.append("r.at >= ?")
        params.append(micros(since))
    if until is not None:
        clauses.append("r.at < ?")
        params.append(micros(until))
    if kinds:
        clauses.append(f"r.kind IN ({','.join('?' * len(kinds))})")
        params.extend(KIND_CODES[k] for k in kinds)
    sql = _select("WHERE " + " AND ".join(clauses) + " ORDER BY r.seq LIMIT ?", is_postgresql(conn))
    rows = conn.execute(sql, (*params, limit + 1)).fetchall()
    events = [_event(machine_id, r) for r in rows[:limit]]
    return Page(events, events[-1].id if len(rows) > limit else None)


def latest(conn: Connection, machine_id: str, n: int, before: int | None = None) -> list[Event]:
    """The newest n events (before the event id `before`, if given), oldest first (what
    `machines show` ends with; the dashboard's timeline pages back with `before`)."""
    where, params = ("WHERE r.seq < ? ", [before]) if before is not None else ("", [])
    rows = conn.execute(
        _select(where + "ORDER BY r.seq DESC LIMIT ?", is_postgresql(conn)),
        (machine_id, *params, n),
    ).fetchall()
    return [_event(machine_id, r) for r in reversed(rows)]


def count(conn: Connection, machine_id: str | None = None, kind: EventKind | None = None) -> int:
    sql, params = "SELECT count(*) FROM machine_events e", []
    clauses: list[str] = []
    if machine_id is not None:
        clauses.append("e.machine = (SELECT num FROM machine_numbers WHERE machine_id = ?)")
        params.append(machine_id)
    if kind is not None:
        clauses.append(f"e.kind = {KIND_CODES[kind]}")
    if clauses:
        sql += " WHERE " + " AND ".join(clauses)
    return int(conn.execute(sql, params).fetchone()[0])


# --- pruning (the background job; each call is one short transaction) -----------------

# Per machine of a range of numbers, the last seq to delete: the (cap+1)-th newest
# event, or the one before the first event at or after the cutoff, whichever is later
# (0: nothing). Times grow with seq (the control plane's clock), so "before the first
# recent one" is "older than the cutoff" without an index on the time.
_EDGES = (
    "SELECT num, max(coalesce((SELECT e.seq FROM machine_events e WHERE e.machine = n.num "
    "ORDER BY e.seq DESC LIMIT 1 OFFSET :cap), 0), coalesce((SELECT e.seq - 1 "
    "FROM machine_events e WHERE e.machine = n.num AND e.at >= :cutoff ORDER BY e.seq "
    "LIMIT 1), (SELECT max(e.seq) FROM machine_events e WHERE e.machine = n.num), 0)) "
    "AS edge FROM machine_numbers n WHERE n.num > :after AND n.num <= :last"
)
# Before the holder of a path goes, the events after it that refer to it get the path.
_KEEP_PATHS = (
    "UPDATE machine_events AS e SET generation = (SELECT h.generation FROM machine_events h "
    "WHERE h.machine = e.machine AND h.seq = e.seq - e.generation) WHERE e.machine = :num "
    "AND e.seq > :edge AND e.seq <= :edge + :lookback AND typeof(e.generation) = 'integer' "
    "AND e.seq - e.generation <= :edge"
)
# The same two on PostgreSQL: positional parameters, greatest() for the scalar max(),
# generation_back for the integer generation (a path written back clears it).
_EDGES_PG = (
    "SELECT num, greatest(coalesce((SELECT e.seq FROM machine_events e WHERE e.machine = n.num "
    "ORDER BY e.seq DESC LIMIT 1 OFFSET ?), 0), coalesce((SELECT e.seq - 1 "
    "FROM machine_events e WHERE e.machine = n.num AND e.at >= ? ORDER BY e.seq "
    "LIMIT 1), (SELECT max(e.seq) FROM machine_events e WHERE e.machine = n.num), 0)) "
    "AS edge FROM machine_numbers n WHERE n.num > ? AND n.num <= ?"
)
_KEEP_PATHS_PG = (
    "UPDATE machine_events AS e SET generation = (SELECT h.generation FROM machine_events h "
    "WHERE h.machine = e.machine AND h.seq = e.seq - e.generation_back), generation_back = NULL "
    "WHERE e.machine = ? AND e.seq > ? AND e.seq <= ? AND e.generation_back IS NOT NULL "
    "AND e.seq - e.generation_back <= ?"
)


def prune(
    conn: Connection, cutoff: datetime, cap: int, after: int, machines: int
) -> tuple[int, int | None]:
    """Events older than cutoff, and beyond the newest `cap`, of the next `machines`
    machines (by number) after `after`.

    Returns how many events went and the last machine number covered (None: no more).
    """
    if is_postgresql(conn):
        return _prune_pg(conn, cutoff, cap, after, machines)
    last = conn.execute(
        "SELECT max(num) FROM (SELECT num FROM machine_numbers WHERE num > ? ORDER BY num LIMIT ?)",
        (after, machines),
    ).fetchone()[0]
    if last is None:
        return 0, None
    edges = [
        {"num": r[0], "edge": r[1], "lookback": LOOKBACK}
        for r in conn.execute(
            _EDGES, {"cap": cap, "cutoff": micros(cutoff), "after": after, "last": last}
        )
        if r[1] > 0
    ]
    conn.executemany(_KEEP_PATHS, edges)
    deleted = 0
    for e in edges:
        cur = conn.execute(
            "DELETE FROM machine_events WHERE machine = ? AND seq <= ?", (e["num"], e["edge"])
        )
        deleted += cur.rowcount
    return deleted, int(last)


def _prune_pg(
    conn: Connection, cutoff: datetime, cap: int, after: int, machines: int
) -> tuple[int, int | None]:
    last = conn.execute(
        "SELECT max(num) FROM (SELECT num FROM machine_numbers WHERE num > ? ORDER BY num "
        "LIMIT ?) m",
        (after, machines),
    ).fetchone()[0]
    if last is None:
        return 0, None
    params = (cap, micros(cutoff), after, last)
    edges = [(int(r[0]), int(r[1])) for r in conn.execute(_EDGES_PG, params) if r[1] > 0]
    if edges:
        # An event appended meanwhile may refer to one about to go: lock the machines
        # with something to delete (lock_machines), then find their edges again.
        nums = [num for num, _ in edges]
        locked = {int(r[1]) for r in conn.execute(_LOCK_PG.format(key="n.num"), (nums,))}
        edges = [
            (int(r[0]), int(r[1]))
            for r in conn.execute(_EDGES_PG, params)
            if r[1] > 0 and r[0] in locked
        ]
    conn.executemany(_KEEP_PATHS_PG, [(num, edge, edge + LOOKBACK, edge) for num, edge in edges])
    deleted = 0
    for num, edge in edges:
        cur = conn.execute("DELETE FROM machine_events WHERE machine = ? AND seq <= ?", (num, edge))
        deleted += cur.rowcount
    return deleted, int(last)
