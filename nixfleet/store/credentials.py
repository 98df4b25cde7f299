"""Operator API keys and per-machine agent tokens, stored as SHA-256 hashes.

Secrets are 256-bit random values, so a fast hash is enough (no password
stretching needed) and lookup by hash keeps authentication one indexed query.
Looking a secret up by its hash is also why no constant-time comparison is needed
here: the database compares digests of the presented value, so response timing can
only leak how many leading bytes of a *hash* matched, which says nothing usable about
the secret (finding an input whose SHA-256 shares a prefix is a preimage search).
The plaintext is returned once, at creation, and never stored or logged.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

from nixfleet.errors import ConflictError, FieldError, NotFoundError, ValidationError
from nixfleet.models import isoformat
from nixfleet.store.conn import Connection

ROLES = ("readonly", "deploy", "admin")
KEY_PREFIX = "nfk_"
TOKEN_PREFIX = "nfm_"
KEY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


def validate_key_name(name: str) -> str:
    """Key names appear in audit actors (`key:<name>`) and URLs: keep them plain."""
    if not KEY_NAME_RE.match(name):
        raise ValidationError(
            f"invalid key name {name[:80]!r}",
            errors=[
                FieldError(
                    "name",
                    "letters, digits, '.', '_' or '-', starting with a letter or digit, "
                    "at most 64 characters",
                )
            ],
        )
    return name


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def token_digest(token: str) -> bytes:
    """A machine token as machine_tokens keeps it: its SHA-256, raw (32 bytes; 100,000
    of them, and the report path's view keys them so too)."""
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class ApiKey:
    name: str
    role: str
    created_at: str
    created_by: str
    revoked_at: str | None


def create_key(conn: Connection, name: str, role: str, created_by: str, now: datetime) -> str:
    """A new random key (returned once); a revoked key's name may be reused."""
    validate_key_name(name)
    if role not in ROLES:
        raise ValidationError(f"unknown role {role!r}; one of: {', '.join(ROLES)}")
    if conn.execute(
        "SELECT 1 FROM api_keys WHERE name = ? AND revoked_at IS NULL", (name,)
    ).fetchone():
        raise ConflictError(f"an API key named {name!r} exists; revoke it or pick another name")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    conn.execute(
        "INSERT INTO api_keys (name, role, key_hash, created_at, created_by) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET role = excluded.role, "
        "key_hash = excluded.key_hash, created_at = excluded.created_at, "
        "created_by = excluded.created_by, revoked_at = NULL",
        (name, role, digest(key), isoformat(now), created_by),
    )
    return key


def import_key(
    conn: Connection, name: str, role: str, key: str, created_by: str, now: datetime
) -> bool:
    """Install a key whose plaintext the host provides (the admin key file); idempotent."""
    hashed = digest(key)
    if conn.execute("SELECT 1 FROM api_keys WHERE key_hash = ?", (hashed,)).fetchone():
        return False
    conn.execute(
        "INSERT INTO api_keys (name, role, key_hash, created_at, created_by) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
        "role = excluded.role, key_hash = excluded.key_hash, revoked_at = NULL",
        (name, role, hashed, isoformat(now), created_by),
    )
    return True


def list_keys(conn: Connection, include_revoked: bool = True) -> list[ApiKey]:
    where = "" if include_revoked else " WHERE revoked_at IS NULL"
    rows = conn.execute(
        f"SELECT name, role, created_at, created_by, revoked_at FROM api_keys{where} ORDER BY name"
    )
    return [ApiKey(*r) for r in rows]


def get_key(conn: Connection, name: str) -> ApiKey:
    row = conn.execute(
        "SELECT name, role, created_at, created_by, revoked_at FROM api_keys WHERE name = ?",
        (name,),
    ).fetchone()
    if row is None:
        raise NotFoundError(f"no API key named {name!r}; see `nixfleet keys list`")
    return ApiKey(*row)


def active_admins(conn: Connection) -> list[str]:
    rows = conn.execute(
        "SELECT name FROM api_keys WHERE role = 'admin' AND revoked_at IS NULL ORDER BY name"
    )
    return [r[0] for r in rows]


def revoke_key(conn: Connection, name: str, now: datetime) -> None:
    cur = conn.execute(
        "UPDATE api_keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
        (isoformat(now), name),
    )
    if cur.rowcount == 0:
        raise NotFoundError(f"no active API key named {name!r}; see `nixfleet keys list`")


def key_role(conn: Connection, key: str) -> tuple[str, str] | None:
    """(name, role) of an active key, or None."""
    row = conn.execute(
        "SELECT name, role FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL",
        (digest(key),),
    ).fetchone()
    return (row["name"], row["role"]) if row else None


def issue_token(conn: Connection, machine_id: str, now: datetime) -> str:
    """Issue (or rotate: the old token stops working at once) a machine's agent token."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    conn.execute(
        "INSERT INTO machine_tokens (machine_id, token_hash, created_at) VALUES (?, ?, ?) "
        "ON CONFLICT (machine_id) DO UPDATE SET token_hash = excluded.token_hash, "
        "created_at = excluded.created_at",
        (machine_id, token_digest(token), isoformat(now)),
    )
    return token


def token_machine(conn: Connection, token: str) -> str | None:
    row = conn.execute(
        "SELECT machine_id FROM machine_tokens WHERE token_hash = ?", (token_digest(token),)
    ).fetchone()
    return row[0] if row else None


def token_machine_lifecycle(conn: Connection, token: str) -> tuple[str, str] | None:
    """The token's machine and its lifecycle, in one indexed look-up; None if unknown."""
    row = conn.execute(
        "SELECT t.machine_id, m.lifecycle FROM machine_tokens t JOIN machines m "
        "ON m.id = t.machine_id WHERE t.token_hash = ?",
        (token_digest(token),),
    ).fetchone()
    return (row[0], row[1]) if row else None


def revoke_token(conn: Connection, machine_id: str) -> bool:
    """Delete the machine's token (it gets 401 from the next request on); True if it had one."""
    cur = conn.execute("DELETE FROM machine_tokens WHERE machine_id = ?", (machine_id,))
    return cur.rowcount > 0


def has_token(conn: Connection, machine_id: str) -> bool:
    row = conn.execute("SELECT 1 FROM machine_tokens WHERE machine_id = ?", (machine_id,))
    return row.fetchone() is not None
