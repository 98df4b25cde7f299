"""GitOps records: what became of each rollout file in the watched directory."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from nixfleet.errors import FieldError
from nixfleet.models import isoformat, parse_time
from nixfleet.store.conn import Connection


@dataclass(frozen=True)
class InvalidFile:
    """A rollout file that could not be applied, with every error found in it."""

    path: str
    name: str | None
    errors: tuple[FieldError, ...]
    checked_at: datetime


def record_file(
    conn: Connection,
    path: str,
    now: datetime,
    *,
    name: str | None,
    rollout_id: str | None,
    errors: Sequence[FieldError] = (),
    mtime_ns: int | None = None,
) -> None:
    conn.execute(
        "INSERT INTO rollout_files (path, status, name, rollout_id, errors_json, mtime_ns, "
        "checked_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (path) DO UPDATE SET "
        "status = excluded.status, name = excluded.name, rollout_id = excluded.rollout_id, "
        "errors_json = excluded.errors_json, mtime_ns = excluded.mtime_ns, "
        "checked_at = excluded.checked_at",
        (
            path,
            "invalid" if errors else "applied",
            name,
            rollout_id,
            json.dumps([e.to_dict() for e in errors]),
            mtime_ns,
            isoformat(now),
        ),
    )


def forget_files(conn: Connection, keep: Iterable[str]) -> None:
    """Drop records of files no longer in the directory (their rollouts stay)."""
    keep = list(keep)
    if not keep:  # PostgreSQL has no empty list `NOT IN ()` (true for every row on SQLite)
        conn.execute("DELETE FROM rollout_files")
        return
    marks = ",".join("?" * len(keep))
    conn.execute(f"DELETE FROM rollout_files WHERE path NOT IN ({marks})", keep)


def invalid_files(conn: Connection) -> list[InvalidFile]:
    rows = conn.execute(
        "SELECT path, name, errors_json, checked_at FROM rollout_files "
        "WHERE status = 'invalid' ORDER BY path"
    )
    return [
        InvalidFile(
            r["path"],
            r["name"],
            tuple(FieldError(**e) for e in json.loads(r["errors_json"])),
            parse_time(r["checked_at"]),  # type: ignore[arg-type]
        )
        for r in rows
    ]
