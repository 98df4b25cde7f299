"""Dashboard sessions: a login with an API key becomes a row, the cookie its secret.

The cookie holds 256 random bits; the table holds their SHA-256 (as for API keys,
see store.credentials), so a copy of the database opens no session. A session is
only as good as its key: a lookup joins api_keys, so revoking the key (or changing
its role) takes effect on the next page. Idle sessions expire; the last-seen time
is written at most once a minute, so a page that refreshes itself every few seconds
does not write on every request.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from nixfleet.models import isoformat, parse_time
from nixfleet.store.conn import Connection
from nixfleet.store.credentials import digest

SESSION_PREFIX = "nfs_"
TOUCH_EVERY = timedelta(seconds=60)


@dataclass(frozen=True)
class Session:
    key_name: str
    role: str
    created_at: datetime
    last_seen_at: datetime


def create(conn: Connection, key_name: str, now: datetime) -> str:
    """A new session for key_name; returns the cookie value (shown once, never stored)."""
    token = SESSION_PREFIX + secrets.token_urlsafe(32)
    at = isoformat(now)
    conn.execute(
        "INSERT INTO ui_sessions (token_hash, key_name, created_at, last_seen_at) "
        "VALUES (?, ?, ?, ?)",
        (digest(token), key_name, at, at),
    )
    return token


def find(conn: Connection, token: str, now: datetime, idle: int) -> Session | None:
    """The live session of this cookie value, or None (unknown, idle too long, key revoked)."""
    row = conn.execute(
        "SELECT s.key_name, k.role, s.created_at, s.last_seen_at FROM ui_sessions s "
        "JOIN api_keys k ON k.name = s.key_name AND k.revoked_at IS NULL "
        "WHERE s.token_hash = ? AND s.last_seen_at >= ?",
        (digest(token), isoformat(now - timedelta(seconds=idle))),
    ).fetchone()
    if row is None:
        return None
    return Session(row[0], row[1], parse_time(row[2]), parse_time(row[3]))  # type: ignore[arg-type]


def touch(conn: Connection, token: str, now: datetime) -> None:
    """Move the idle deadline on (callers do so when TOUCH_EVERY has passed)."""
    conn.execute(
        "UPDATE ui_sessions SET last_seen_at = ? WHERE token_hash = ?",
        (isoformat(now), digest(token)),
    )


def delete(conn: Connection, token: str) -> None:
    conn.execute("DELETE FROM ui_sessions WHERE token_hash = ?", (digest(token),))


def prune(conn: Connection, now: datetime, idle: int) -> int:
    """Forget sessions idle past their expiry; returns how many."""
    cur = conn.execute(
        "DELETE FROM ui_sessions WHERE last_seen_at < ?",
        (isoformat(now - timedelta(seconds=idle)),),
    )
    return cur.rowcount
