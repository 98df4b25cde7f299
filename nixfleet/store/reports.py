"""Report history: append on every poll, bounded per machine."""

from __future__ import annotations

import json
import sqlite3

from nixfleet.models import HealthResult, Report, isoformat, parse_time


def append(conn: sqlite3.Connection, report: Report, health_json: str | None, keep: int) -> None:
    cur = conn.execute(
        "INSERT INTO reports (machine_id, received_at, current_generation, success, message, "
        "attempted_generation, health_json, agent_version, uptime_seconds) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            report.machine_id,
            isoformat(report.received_at),
            report.current_generation,
            int(report.success),
            report.message,
            report.attempted_generation,
            health_json,
            report.agent_version,
            report.uptime_seconds,
        ),
    )
    # Prune in the same transaction: the oldest row beyond `keep` goes as a new one comes,
    # so history is bounded without a background job (one indexed range delete).
    newest = cur.lastrowid
    conn.execute(
        "DELETE FROM reports WHERE machine_id = ? AND id <= "
        "(SELECT id FROM reports WHERE machine_id = ? AND id <= ? ORDER BY id DESC "
        "LIMIT 1 OFFSET ?)",
        (report.machine_id, report.machine_id, newest, keep),
    )


def recent(conn: sqlite3.Connection, machine_id: str, limit: int) -> list[Report]:
    rows = conn.execute(
        "SELECT * FROM reports WHERE machine_id = ? ORDER BY id DESC LIMIT ?",
        (machine_id, limit),
    )
    return [
        Report(
            machine_id=r["machine_id"],
            received_at=parse_time(r["received_at"]),  # type: ignore[arg-type]
            current_generation=r["current_generation"],
            success=bool(r["success"]),
            message=r["message"],
            attempted_generation=r["attempted_generation"],
            health=HealthResult.from_dict(json.loads(r["health_json"]))
            if r["health_json"]
            else None,
            agent_version=r["agent_version"],
            uptime_seconds=r["uptime_seconds"],
        )
        for r in rows
    ]
