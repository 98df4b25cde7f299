"""What the report path's in-memory view reads and writes (nixfleet.api.report_cache).

`cache_changes` (migration 0014) lists every change to what a report is answered
from or judged against, in commit order: triggers write the machine, token and
rollout rows; the two bulk desired-generation writes of a reconciler tick and an
operator's desired generation record themselves (`note_members`, `note_machine`).
Each server process reads the rows after the last one it applied and reloads
exactly those machines and rollouts.

On PostgreSQL every row is written by the SQL function `cache_change`, which numbers
it in commit order and notifies the replicas (store.pg_notify); numbers rolled back
with their transaction are not reused there, so a gap is not always a pruned row
(`pruned_before`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from nixfleet.heartbeat import HealthKey, Known
from nixfleet.store.conn import Connection, is_postgresql
from nixfleet.store.rows import stored_health_key

KEEP_CHANGES = 100_000  # rows the pruning keeps; a process further behind reloads everything


@dataclass(frozen=True, slots=True)
class CachedMachine:
    id: str
    token_hash: bytes | None  # SHA-256 of the machine's token (credentials.token_digest)
    known: Known
    desired_generation: str | None
    desired_cache_url: str | None
    retry_requested_at: str | None
    rollouts: tuple[str, ...]  # the running or paused rollouts it belongs to


@dataclass(frozen=True, slots=True)
class CachedRollout:
    """A running rollout's part of the answer (the report path reads only running ones)."""

    id: str
    poll_hint: int | None
    confirm_timeout: int | None
    reboot: str | None


@dataclass(frozen=True, slots=True)
class Change:
    seq: int
    kind: str  # 'machine' | 'rollout' | 'members'
    machine_id: str | None
    rollout_id: str | None
    lo: int | None  # members: positions (lo, hi]; None: every member
    hi: int | None


def note_machine(conn: Connection, machine_id: str) -> None:
    if is_postgresql(conn):  # in commit order, and published (0004_baseline.sql)
        conn.execute("SELECT cache_change('machine', ?, NULL, NULL, NULL)", (machine_id,))
        return
    conn.execute(
        "INSERT INTO cache_changes (kind, machine_id) VALUES ('machine', ?)", (machine_id,)
    )


def note_members(conn: Connection, rollout_id: str, lo: int, hi: int) -> None:
    """The machines of a rollout at positions (lo, hi] changed (a tick's desired write)."""
    if is_postgresql(conn):
        conn.execute(
            "SELECT cache_change('members', NULL, ?, ?::integer, ?::integer)",
            (rollout_id, lo, hi),
        )
        return
    conn.execute(
        "INSERT INTO cache_changes (kind, rollout_id, lo, hi) VALUES ('members', ?, ?, ?)",
        (rollout_id, lo, hi),
    )


def last_seq(conn: Connection) -> int:
    if is_postgresql(conn):  # committed in order: every lower number is decided
        row = conn.execute("SELECT coalesce(max(seq), 0) FROM cache_changes").fetchone()
    else:
        row = conn.execute(
            "SELECT seq FROM sqlite_sequence WHERE name = 'cache_changes'"
        ).fetchone()
    return 0 if row is None else int(row[0])


def data_version(conn: Connection) -> int:
    """SQLite's counter of commits by other connections (moves for writes beside Store).

    PostgreSQL has no twin, and needs none: every writer goes through cache_change."""
    if is_postgresql(conn):
        return 0
    return int(conn.execute("PRAGMA data_version").fetchone()[0])


def pruned_before(conn: Connection, seq: int) -> bool:
    """After a gap following `seq`: whether rows after it may have been pruned.

    The pruning deletes the oldest rows, so it did not when a row up to `seq` is left
    (on PostgreSQL a gap is also a number rolled back; SQLite's numbers have none)."""
    row = conn.execute("SELECT 1 FROM cache_changes WHERE seq <= ? LIMIT 1", (seq,)).fetchone()
    return row is None


def changes_since(conn: Connection, seq: int) -> list[Change]:
    """The changes after `seq`, oldest first (on SQLite numbered without gaps: AUTOINCREMENT
    is rolled back with its transaction, so a gap after `seq` means pruned)."""
    rows = conn.execute(
        "SELECT seq, kind, machine_id, rollout_id, lo, hi FROM cache_changes WHERE seq > ? "
        "ORDER BY seq",
        (seq,),
    ).fetchall()
    return [Change(*r) for r in rows]


def members(conn: Connection, rollout_id: str, lo: int | None, hi: int | None) -> list[str]:
    if lo is None or hi is None:
        rows = conn.execute(
            "SELECT machine_id FROM rollout_machines WHERE rollout_id = ?", (rollout_id,)
        )
    else:
        rows = conn.execute(
            "SELECT machine_id FROM rollout_machines WHERE rollout_id = ? AND position > ? "
            "AND position <= ?",
            (rollout_id, lo, hi),
        )
    return [r[0] for r in rows]


_MACHINES = (
    "SELECT m.id, t.token_hash, m.lifecycle, m.current_generation, m.last_success, "
    "m.last_message, m.failed_generation, m.health_json, m.system_state, m.agent_version, "
    "m.needs_reboot, m.booted_generation, m.desired_generation, m.desired_cache_url, "
    "m.retry_requested_at, (SELECT json_group_array(tag) FROM machine_tags "
    "WHERE machine_id = m.id AND source = 'agent') AS agent_tags, "
    "(SELECT json_group_array(rm.rollout_id) FROM rollout_machines rm "
    "JOIN rollouts r ON r.id = rm.rollout_id WHERE rm.machine_id = m.id "
    "AND r.status IN ('running', 'paused')) AS rollouts "
    "FROM machines m LEFT JOIN machine_tokens t ON t.machine_id = m.id"
)
# The same rows, JSON text as SQLite's (json_agg: an empty set is NULL there).
_MACHINES_PG = _MACHINES.replace(
    "json_group_array(tag)", "coalesce(json_agg(tag)::text, '[]')"
).replace("json_group_array(rm.rollout_id)", "coalesce(json_agg(rm.rollout_id)::text, '[]')")


class _Shared:
    """One object for each distinct value many machines share (memory, parse time)."""

    def __init__(self) -> None:
        self.health: dict[str | None, HealthKey | None] = {None: None}
        self.tags: dict[str, frozenset[str]] = {}
        self.rollouts: dict[str, tuple[str, ...]] = {}
        self.text: dict[str, str] = {}

    def one(self, value: str | None) -> str | None:
        return None if value is None else self.text.setdefault(value, value)


def load_machines(
    conn: Connection, ids: Iterable[str] | None = None
) -> tuple[list[CachedMachine], list[str]]:
    """The machines (all of them when ids is None) and, of `ids`, those that do not exist."""
    pg = is_postgresql(conn)
    if ids is None:
        rows = conn.execute(_MACHINES_PG if pg else _MACHINES)
        wanted: set[str] = set()
    else:
        wanted = set(ids)
        if pg:
            rows = conn.execute(_MACHINES_PG + " WHERE m.id = ANY(?::text[])", (sorted(wanted),))
        else:
            rows = conn.execute(
                _MACHINES + " WHERE m.id IN (SELECT value FROM json_each(?))",
                (json.dumps(sorted(wanted)),),
            )
    shared = _Shared()
    out = []
    for r in rows:
        health = shared.health.get(r[7])
        if health is None and r[7] is not None:
            health = shared.health[r[7]] = stored_health_key(r[7])
        tags = shared.tags.get(r[15])
        if tags is None:
            tags = shared.tags[r[15]] = frozenset(json.loads(r[15]))
        rollouts = shared.rollouts.get(r[16])
        if rollouts is None:
            rollouts = shared.rollouts[r[16]] = tuple(json.loads(r[16]))
        known = Known(
            lifecycle=shared.one(r[2]) or "",
            current_generation=r[3],
            last_success=None if r[4] is None else bool(r[4]),
            last_message=shared.one(r[5]),
            failed_generation=r[6],
            health=health,
            system_state=shared.one(r[8]) or "",
            agent_version=shared.one(r[9]),
            needs_reboot=None if r[10] is None else bool(r[10]),
            booted_generation=r[11],
            agent_tags=tags,
        )
        out.append(
            CachedMachine(
                id=r[0],
                token_hash=r[1],
                known=known,
                desired_generation=r[12],
                desired_cache_url=shared.one(r[13]),
                retry_requested_at=r[14],
                rollouts=rollouts,
            )
        )
        wanted.discard(r[0])
    return out, sorted(wanted)


def running_rollouts(
    conn: Connection, ids: Sequence[str] | None = None
) -> tuple[list[CachedRollout], list[str]]:
    """Running rollouts (of `ids`, if given) and, of `ids`, those not running."""
    sql = "SELECT id, poll_hint, confirm_timeout, reboot FROM rollouts WHERE status = 'running'"
    if ids is None:
        found = [CachedRollout(*r) for r in conn.execute(sql)]
        return found, []
    if is_postgresql(conn):
        rows = conn.execute(sql + " AND id = ANY(?::text[])", (list(ids),))
    else:
        rows = conn.execute(
            sql + " AND id IN (SELECT value FROM json_each(?))", (json.dumps(list(ids)),)
        )
    found = [CachedRollout(*r) for r in rows]
    running = {r.id for r in found}
    return found, [i for i in ids if i not in running]


def write_last_seen(conn: Connection, seen: Sequence[tuple[str, str, int | None]]) -> None:
    """Heartbeats' (machine, time, uptime); a later report is kept.

    executemany of one prepared UPDATE: ~1.4 ms for 300 machines, where one UPDATE …
    FROM json_each(?) of the same rows took ~16 ms (docs/performance.md). On
    PostgreSQL one UPDATE from three arrays: one statement, one round trip.
    """
    if is_postgresql(conn):
        conn.execute(
            "UPDATE machines m SET last_report_at = s.at, uptime_seconds = s.up "
            "FROM unnest(?::text[], ?::text[], ?::bigint[]) AS s (id, at, up) "
            "WHERE m.id = s.id AND (m.last_report_at IS NULL OR m.last_report_at < s.at)",
            ([r[0] for r in seen], [r[1] for r in seen], [r[2] for r in seen]),
        )
        return
    conn.executemany(
        "UPDATE machines SET last_report_at = ?2, uptime_seconds = ?3 "
        "WHERE id = ?1 AND (last_report_at IS NULL OR last_report_at < ?2)",
        seen,
    )


def prune(conn: Connection, keep: int = KEEP_CHANGES) -> int:
    """Keep the newest `keep` changes (never the last one: it holds the sequence)."""
    cur = conn.execute(
        "DELETE FROM cache_changes WHERE seq <= (SELECT max(seq) FROM cache_changes) - ?",
        (max(keep, 1),),
    )
    return cur.rowcount
