"""What the report path's in-memory view reads and writes (nixfleet.api.report_cache).

`cache_changes` (migration 0014) lists every change to what a report is answered
from or judged against, in commit order: triggers write the machine, token and
rollout rows; the two bulk desired-generation writes of a reconciler tick and an
operator's desired generation record themselves (`note_members`, `note_machine`).
Each server process reads the rows after the last one it applied and reloads
exactly those machines and rollouts.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from nixfleet.heartbeat import HealthKey, Known
from nixfleet.store.conn import Connection
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
    conn.execute(
        "INSERT INTO cache_changes (kind, machine_id) VALUES ('machine', ?)", (machine_id,)
    )


def note_members(conn: sqlite3.Connection, rollout_id: str, lo: int, hi: int) -> None:
    """The machines of a rollout at positions (lo, hi] changed (a tick's desired write)."""
    conn.execute(
        "INSERT INTO cache_changes (kind, rollout_id, lo, hi) VALUES ('members', ?, ?, ?)",
        (rollout_id, lo, hi),
    )


def last_seq(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'cache_changes'").fetchone()
    return 0 if row is None else int(row[0])


def data_version(conn: sqlite3.Connection) -> int:
    """SQLite's counter of commits by other connections (moves for writes beside Store)."""
    return int(conn.execute("PRAGMA data_version").fetchone()[0])


def changes_since(conn: sqlite3.Connection, seq: int) -> list[Change]:
    """The changes after `seq`, oldest first (rows are numbered without gaps: AUTOINCREMENT,
    rolled back with their transaction, so a gap after `seq` means pruned)."""
    rows = conn.execute(
        "SELECT seq, kind, machine_id, rollout_id, lo, hi FROM cache_changes WHERE seq > ? "
        "ORDER BY seq",
        (seq,),
    ).fetchall()
    return [Change(*r) for r in rows]


def members(conn: sqlite3.Connection, rollout_id: str, lo: int | None, hi: int | None) -> list[str]:
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
    conn: sqlite3.Connection, ids: Iterable[str] | None = None
) -> tuple[list[CachedMachine], list[str]]:
    """The machines (all of them when ids is None) and, of `ids`, those that do not exist."""
    if ids is None:
        rows = conn.execute(_MACHINES)
        wanted: set[str] = set()
    else:
        wanted = set(ids)
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
    conn: sqlite3.Connection, ids: Sequence[str] | None = None
) -> tuple[list[CachedRollout], list[str]]:
    """Running rollouts (of `ids`, if given) and, of `ids`, those not running."""
    sql = "SELECT id, poll_hint, confirm_timeout, reboot FROM rollouts WHERE status = 'running'"
    if ids is None:
        found = [CachedRollout(*r) for r in conn.execute(sql)]
        return found, []
    found = [
        CachedRollout(*r)
        for r in conn.execute(
            sql + " AND id IN (SELECT value FROM json_each(?))", (json.dumps(list(ids)),)
        )
    ]
    running = {r.id for r in found}
    return found, [i for i in ids if i not in running]


def write_last_seen(conn: sqlite3.Connection, seen: Sequence[tuple[str, str, int | None]]) -> None:
    """Heartbeats' (machine, time, uptime); a later report is kept.

    executemany of one prepared UPDATE: ~1.4 ms for 300 machines, where one UPDATE …
    FROM json_each(?) of the same rows took ~16 ms (docs/performance.md).
    """
    conn.executemany(
        "UPDATE machines SET last_report_at = ?2, uptime_seconds = ?3 "
        "WHERE id = ?1 AND (last_report_at IS NULL OR last_report_at < ?2)",
        seen,
    )


def prune(conn: sqlite3.Connection, keep: int = KEEP_CHANGES) -> int:
    """Keep the newest `keep` changes (never the last one: it holds the sequence)."""
    cur = conn.execute(
        "DELETE FROM cache_changes WHERE seq <= (SELECT max(seq) FROM cache_changes) - ?",
        (max(keep, 1),),
    )
    return cur.rowcount
