"""Releases: immutable manifests of one system closure per host.

A release is written once (its id is a hash of its entries, so registering the same
entries again finds the existing row) and deleted only while no rollout uses it.
An old, unused release is pruned (store.retention): its header stays, its entries go;
registering the same entries again restores them.

One spelling for both backends. On PostgreSQL (READ COMMITTED, several writers)
insert and delete lock the release's row (FOR UPDATE) before deciding on what they
read: SQLite's single writer gives that order for free.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime

from nixfleet.errors import ConflictError, GoneError, NotFoundError
from nixfleet.models import Release, ReleaseEntry, isoformat, parse_time, time_of
from nixfleet.store.conn import Connection, Row, is_postgresql
from nixfleet.store.rows import from_row


def insert(conn: Connection, release: Release, now: datetime, created_by: str) -> bool:
    """Store a release; False (and nothing written) when its id already exists.

    A pruned release (store.retention) gets its entries back (the same id means the
    same entries) and True; its header is the one first registered. The header goes
    first, ON CONFLICT DO NOTHING: two requests registering one release at once
    (PostgreSQL) write it once, the second waits for the first and finds it; a known
    one is then read under its row lock, so that two restores (or a restore and the
    pruning) do not both write its entries.
    """
    added = conn.execute(
        "INSERT INTO releases (id, flake_ref, flake_rev, cache_url, created_at, created_by) "
        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING RETURNING id",
        (
            release.id,
            release.flake_ref,
            release.flake_rev,
            release.cache_url,
            isoformat(release.created_at or now),
            release.created_by or created_by,
        ),
    ).fetchone()
    if added is None:
        lock = " FOR UPDATE" if is_postgresql(conn) else ""
        known = conn.execute(
            f"SELECT pruned_at FROM releases WHERE id = ?{lock}", (release.id,)
        ).fetchone()
        if known is None:  # deleted since the INSERT saw it (PostgreSQL): register it
            return insert(conn, release, now, created_by)
        if known["pruned_at"] is None:
            return False
        # restore: whatever entries the pruning had not deleted yet, then all of them
        conn.execute("DELETE FROM release_entries WHERE release_id = ?", (release.id,))
        conn.execute("UPDATE releases SET pruned_at = NULL WHERE id = ?", (release.id,))
    conn.executemany(
        "INSERT INTO release_entries (release_id, hostname, store_path, platform, tags_json) "
        "VALUES (?, ?, ?, ?, ?)",
        [
            (release.id, e.hostname, e.store_path, e.platform, json.dumps(list(e.tags)))
            for e in release.entries
        ],
    )
    return True


def _entries(conn: Connection, ids: list[str]) -> dict[str, list[ReleaseEntry]]:
    out: dict[str, list[ReleaseEntry]] = defaultdict(list)
    if not ids:
        return out
    marks = ",".join("?" * len(ids))
    rows = conn.execute(
        "SELECT release_id, hostname, store_path, platform, tags_json FROM release_entries "
        f"WHERE release_id IN ({marks}) ORDER BY release_id, hostname",
        ids,
    )
    for r in rows:
        out[r["release_id"]].append(
            ReleaseEntry(
                r["hostname"], r["store_path"], r["platform"], tuple(json.loads(r["tags_json"]))
            )
        )
    return out


def _release(row: Row, entries: list[ReleaseEntry]) -> Release:
    return Release(
        id=row["id"],
        entries=tuple(entries),
        flake_ref=row["flake_ref"],
        flake_rev=row["flake_rev"],
        cache_url=row["cache_url"],
        created_at=parse_time(row["created_at"]),
        created_by=row["created_by"],
    )


def _header(conn: Connection, release_id: str) -> Row:
    row: Row | None = conn.execute("SELECT * FROM releases WHERE id = ?", (release_id,)).fetchone()
    if row is None:
        raise NotFoundError(
            f"release {release_id!r} is not registered; see `nixfleet release list`, or "
            "register it with `nixfleet release create` / `nixfleet release register FILE`"
        )
    return row


def _usable(row: Row) -> None:
    """410 for a pruned release, saying how to get it back."""
    if row["pruned_at"] is not None:
        raise GoneError(
            f"release {row['id']!r} was pruned at {row['pruned_at']} (no rollout or "
            "machine needed it: docs/releases.md, Retention): its entries are gone; register "
            "it again "
            f"from releases/{row['id']}.toml (`nixfleet release register FILE`: the same "
            "entries give the same id) to use it"
        )


def get(conn: Connection, release_id: str) -> Release:
    """The release with its entries; 404 if unknown, 410 if pruned (store.retention)."""
    row = _header(conn, release_id)
    _usable(row)
    return _release(row, _entries(conn, [release_id])[release_id])


@dataclass(frozen=True)
class ReleaseSummary:
    """A release in a listing: its header and counts, not its entries."""

    id: str
    flake_ref: str | None
    flake_rev: str | None
    cache_url: str | None
    created_at: datetime
    created_by: str
    hosts: int
    rollouts: int  # rollouts that reference it (it cannot be deleted while any does)
    pruned_at: datetime | None = None  # store.retention: its entries are gone (hosts 0)


def list_releases(conn: Connection, limit: int = 100) -> list[ReleaseSummary]:
    """Newest first, with host counts (not the entries: a listing stays small)."""
    rows = conn.execute(
        "SELECT r.*, CASE WHEN r.pruned_at IS NULL THEN (SELECT COUNT(*) FROM release_entries e "
        "WHERE e.release_id = r.id) ELSE 0 END AS hosts, "
        "(SELECT COUNT(*) FROM rollouts o WHERE o.release_id = r.id) AS rollouts "
        "FROM releases r ORDER BY r.created_at DESC, r.id LIMIT ?",
        (limit,),
    )
    return [
        from_row(
            ReleaseSummary,
            r,
            created_at=time_of(r["created_at"]),
            pruned_at=parse_time(r["pruned_at"]),
        )
        for r in rows
    ]


def store_paths(conn: Connection, release_id: str) -> dict[str, str]:
    """hostname -> store path: what planning needs, without building ReleaseEntry objects.

    Nothing for an unknown release (planning says why), 410 for a pruned one."""
    row = conn.execute("SELECT * FROM releases WHERE id = ?", (release_id,)).fetchone()
    if row is not None:
        _usable(row)
    rows = conn.execute(
        "SELECT hostname, store_path FROM release_entries WHERE release_id = ?", (release_id,)
    )
    return {r["hostname"]: r["store_path"] for r in rows}


def delete(conn: Connection, release_id: str) -> None:
    """Delete a release no rollout records (a pruned one too); 404, 409 otherwise.

    On PostgreSQL the row is locked first: a rollout being created on it (whose
    foreign key check shares that lock) either commits before, and is seen, or
    waits for the deletion.
    """
    if is_postgresql(conn):
        conn.execute("SELECT 1 FROM releases WHERE id = ? FOR UPDATE", (release_id,))
    _header(conn, release_id)
    used = [
        r["name"]
        for r in conn.execute(
            "SELECT name FROM rollouts WHERE release_id = ? ORDER BY created_at", (release_id,)
        )
    ]
    if used:
        raise ConflictError(
            f"release {release_id!r} is referenced by rollout(s) {', '.join(used)}; "
            "a release stays while a rollout records it"
        )
    conn.execute("DELETE FROM releases WHERE id = ?", (release_id,))
