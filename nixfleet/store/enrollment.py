"""Enrollment tokens: limited, expiring secrets an agent trades for its machine token.

An operator hands one token to many new machines (an install image, a cloud-init
file); each exchange registers the machine with the token's preset tags and uses it
up by one, in the same transaction as the registration, so two agents racing for
the last use cannot both win. Like API keys, only the SHA-256 of the token is stored;
`id` is a public, non-secret handle for listing and revoking.
"""

from __future__ import annotations

import fnmatch
import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from nixfleet.errors import AuthenticationError, NotFoundError, PermissionDeniedError
from nixfleet.models import isoformat, parse_time
from nixfleet.store.conn import Connection, Row
from nixfleet.store.credentials import digest
from nixfleet.store.rows import from_row

ENROLL_PREFIX = "nfe_"
MAX_USES = 100_000
MAX_LIFETIME = timedelta(days=366)

COLUMNS = (
    "id, created_at, created_by, expires_at, uses_left, uses_total, tags_json, "
    "hostname_glob, revoked_at, last_used_at"
)


@dataclass(frozen=True)
class EnrollToken:
    id: str
    created_at: str
    created_by: str
    expires_at: str
    uses_left: int
    uses_total: int
    tags: tuple[str, ...]
    hostname_glob: str | None
    revoked_at: str | None
    last_used_at: str | None

    def state(self, now: datetime) -> str:
        """active, revoked, expired or used-up: why an exchange would be refused."""
        if self.revoked_at is not None:
            return "revoked"
        expires = parse_time(self.expires_at)
        if expires is None or expires <= now:
            return "expired"
        if self.uses_left <= 0:
            return "used-up"
        return "active"


def _token(r: Row) -> EnrollToken:
    return from_row(EnrollToken, r, tags=tuple(json.loads(r["tags_json"])))


def create(
    conn: Connection,
    *,
    uses: int,
    lifetime: timedelta,
    tags: list[str],
    hostname_glob: str | None,
    created_by: str,
    now: datetime,
) -> tuple[EnrollToken, str]:
    """A new enrollment token and its plaintext (shown once)."""
    secret = ENROLL_PREFIX + secrets.token_urlsafe(32)
    token_id = "et-" + secrets.token_hex(6)
    conn.execute(
        f"INSERT INTO enroll_tokens ({COLUMNS}, token_hash) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, ?)",
        (
            token_id,
            isoformat(now),
            created_by,
            isoformat(now + lifetime),
            uses,
            uses,
            json.dumps(sorted(set(tags))),
            hostname_glob,
            digest(secret),
        ),
    )
    return get(conn, token_id), secret


def get(conn: Connection, token_id: str) -> EnrollToken:
    row = conn.execute(f"SELECT {COLUMNS} FROM enroll_tokens WHERE id = ?", (token_id,)).fetchone()
    if row is None:
        raise NotFoundError(f"no enrollment token {token_id!r}; see `nixfleet enroll-tokens list`")
    return _token(row)


def list_tokens(conn: Connection) -> list[EnrollToken]:
    rows = conn.execute(f"SELECT {COLUMNS} FROM enroll_tokens ORDER BY created_at, id")
    return [_token(r) for r in rows]


def revoke(conn: Connection, token_id: str, now: datetime) -> EnrollToken:
    found = get(conn, token_id)
    if found.revoked_at is None:
        conn.execute(
            "UPDATE enroll_tokens SET revoked_at = ? WHERE id = ?", (isoformat(now), token_id)
        )
    return get(conn, token_id)


def redeem(conn: Connection, secret: str, machine_id: str, now: datetime) -> EnrollToken:
    """Check the token for this machine and use it up by one; call inside the transaction
    that registers the machine, so a later failure gives the use back.

    Unknown, revoked, expired and used-up tokens are 401 (the credential is no good);
    a hostname outside the token's glob is 403 (good credential, not for this machine).
    """
    row = conn.execute(
        f"SELECT {COLUMNS} FROM enroll_tokens WHERE token_hash = ?", (digest(secret),)
    ).fetchone()
    if row is None:
        raise AuthenticationError("the enrollment token is unknown")
    token = _token(row)
    state = token.state(now)
    if state != "active":
        raise AuthenticationError(
            f"enrollment token {token.id} is {state}; ask an operator for a new one "
            "(`nixfleet enroll-tokens create`)"
        )
    if token.hostname_glob is not None and not fnmatch.fnmatchcase(machine_id, token.hostname_glob):
        raise PermissionDeniedError(
            f"enrollment token {token.id} only enrolls hostnames matching "
            f"{token.hostname_glob!r}, not {machine_id!r}"
        )
    # The WHERE clause re-checks uses_left, so the decrement is safe even without the
    # write lock that BEGIN IMMEDIATE already holds.
    cur = conn.execute(
        "UPDATE enroll_tokens SET uses_left = uses_left - 1, last_used_at = ? "
        "WHERE id = ? AND uses_left > 0",
        (isoformat(now), token.id),
    )
    if cur.rowcount != 1:
        raise AuthenticationError(f"enrollment token {token.id} is used-up")
    return token
