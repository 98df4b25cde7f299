"""The audit log: every mutation, with its actor."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from nixfleet.models import isoformat
from nixfleet.store.conn import Connection
from nixfleet.wire import JSONObject


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: str
    actor: str
    action: str
    target: str
    detail: JSONObject


def record(
    conn: Connection,
    actor: str,
    action: str,
    target: str,
    now: datetime,
    detail: Mapping[str, Any] | None = None,
) -> None:
    conn.execute(
        "INSERT INTO audit (at, actor, action, target, detail_json) VALUES (?, ?, ?, ?, ?)",
        (isoformat(now), actor, action, target, json.dumps(dict(detail or {}), sort_keys=True)),
    )


def query(
    conn: Connection,
    actor: str | None = None,
    action: str | None = None,
    target: str | None = None,
    limit: int = 100,
) -> list[AuditEntry]:
    clauses, params = [], []
    for column, value in (("actor", actor), ("action", action), ("target", target)):
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    where = " WHERE " + " AND ".join(clauses) if clauses else ""
    rows = conn.execute(
        f"SELECT id, at, actor, action, target, detail_json FROM audit{where} "
        "ORDER BY id DESC LIMIT ?",
        (*params, limit),
    )
    return [
        AuditEntry(
            r["id"], r["at"], r["actor"], r["action"], r["target"], json.loads(r["detail_json"])
        )
        for r in rows
    ]
