"""Build a fresh control-plane database holding a synthetic fleet.

The schema comes from the real migrations (Store.migrate) and credentials from the
real hashing (credentials.digest), so the control plane under test cannot tell the
result from a fleet that grew through the API; only the bulk insert is direct SQL,
because registering 100,000 machines one HTTP request at a time would take longer
than the benchmarks themselves.

    python bench/build_db.py --machines 100000 --events 3 --out /tmp/fleet.db
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fleet

from nixfleet.history import EventKind
from nixfleet.models import HealthResult, isoformat
from nixfleet.store import Store, credentials, event_forms
from nixfleet.store.machines import TAG_SOURCES
from nixfleet.store.rows import health_to_stored

CHUNK = 20_000
REPORT_HEALTH = health_to_stored(HealthResult.from_dict(fleet.HEALTH))  # its stored form
REPORT_HEALTH_AXIS = "healthy" if fleet.HEALTH["all_passed"] else "failing"  # models.health_of


def lifecycle(i: int) -> str:
    """97 % active, 1 % maintenance, 1 % pending (never reported), 1 % decommissioned."""
    return {99: "pending", 98: "maintenance", 97: "decommissioned"}.get(i % 100, "active")


def reporting(i: int) -> bool:
    """Machines whose agents poll (the load generator uses only these)."""
    return lifecycle(i) in ("active", "maintenance")


def _chunks(rows: Iterator[tuple[Any, ...]]) -> Iterator[list[tuple[Any, ...]]]:
    chunk: list[tuple[Any, ...]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


MACHINE_COLUMNS = (
    "id",
    "lifecycle",
    "registered_at",
    "current_generation",
    "desired_generation",
    "desired_cache_url",
    "desired_source",
    "desired_set_at",
    "last_report_at",
    "agent_version",
    "system_state",
    "last_success",
    "last_message",
    "failed_generation",
    "health_json",
    "health",
    "uptime_seconds",
    "retry_requested_at",
    "poll_hint",
)


def _machines(n: int, now: datetime) -> Iterator[tuple[Any, ...]]:
    registered = isoformat(now - timedelta(days=30))
    for i in range(n):
        life = lifecycle(i)
        if life == "pending":
            yield (
                fleet.hostname(i),
                life,
                registered,
                *([None] * 7),
                "unknown",
                *([None] * 4),
                "unknown",
                *([None] * 3),
            )
            continue
        # 2 % went quiet (stale), the rest reported within the last minute.
        age = 3600 + i % 600 if i % 50 == 0 else i % 60
        if i % 10 == 0:
            desired, source = fleet.next_generation(i), "operator"  # updating
        elif i % 10 < 7:
            desired, source = fleet.current_generation(i), "operator"  # in sync
        else:
            desired, source = None, None
        yield (
            fleet.hostname(i),
            life,
            registered,
            fleet.current_generation(i),
            desired,
            "https://cache.example" if desired else None,
            source,
            registered if desired else None,
            isoformat(now - timedelta(seconds=age)),
            "0.1.0",
            "ok",
            1,
            "running",
            None,
            REPORT_HEALTH,
            REPORT_HEALTH_AXIS,
            86_400 + i,
            None,
            None,
        )


def _tags(n: int, numbers: dict[str, int]) -> Iterator[tuple[int, str, int]]:
    agent, operator = TAG_SOURCES["agent"], TAG_SOURCES["operator"]
    for i in range(n):
        num = numbers[fleet.hostname(i)]
        if lifecycle(i) != "pending":
            for tag in fleet.agent_tags(i):
                yield num, tag, agent
        for tag in fleet.operator_tags(i):
            yield num, tag, operator
        yield num, "fleet", operator  # every machine: the bench rollout's target


def _tokens(n: int, now: datetime) -> Iterator[tuple[str, bytes, str]]:
    at = isoformat(now - timedelta(days=30))
    for i in range(n):
        yield fleet.hostname(i), credentials.token_digest(fleet.token(i)), at


def _events(
    n: int, per_machine: int, now: datetime, numbers: dict[str, int]
) -> Iterator[tuple[Any, ...]]:
    # History (machine_events): per machine, the last `per_machine` changes were
    # generation switches, interleaved by time as a real fleet's changes arrive.
    for k in range(per_machine, 0, -1):
        for i in range(n):
            if not reporting(i):
                continue
            host = fleet.hostname(i)
            at = event_forms.micros(now - timedelta(days=k, seconds=i % 60))
            gen = event_forms.encode_path(fleet.current_generation(i), host)
            code = event_forms.KIND_CODES[EventKind.GENERATION]
            yield numbers[host], per_machine - k + 1, at, code, event_forms.AGENT, gen, None


def build(path: Path, machines: int, events_per_machine: int, quiet: bool = False) -> str:
    """Create the database; return the admin API key."""
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    started = time.monotonic()
    now = datetime.now(UTC)
    store = Store(path)
    with store.transaction() as conn:
        key = credentials.create_key(conn, "bench-admin", "admin", "bench", now)
    store.close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("BEGIN")
    for chunk in _chunks(_machines(machines, now)):
        conn.executemany(
            f"INSERT INTO machines ({', '.join(MACHINE_COLUMNS)}) "
            f"VALUES ({','.join('?' * len(MACHINE_COLUMNS))})",
            chunk,
        )
    numbers = dict(conn.execute("SELECT machine_id, num FROM machine_numbers"))
    for chunk in _chunks(_tags(machines, numbers)):
        conn.executemany(
            "INSERT INTO machine_tag_rows (machine, tag, source) VALUES (?, ?, ?)", chunk
        )
    for chunk in _chunks(_tokens(machines, now)):
        conn.executemany(
            "INSERT INTO machine_tokens (machine_id, token_hash, created_at) VALUES (?, ?, ?)",
            chunk,
        )
    for chunk in _chunks(_events(machines, events_per_machine, now, numbers)):
        conn.executemany(
            "INSERT INTO machine_events (machine, seq, at, kind, source, generation, "
            "detail) VALUES (?, ?, ?, ?, ?, ?, ?)",
            chunk,
        )
    conn.execute("COMMIT")
    conn.execute("ANALYZE")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    if not quiet:
        size = path.stat().st_size / 2**20
        print(
            f"built {path}: {machines} machines, {events_per_machine} history events each, "
            f"{size:.1f} MiB in {time.monotonic() - started:.1f}s",
            file=sys.stderr,
        )
    return key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--machines", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=3, help="history events per machine")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    print(build(args.out, args.machines, args.events))


if __name__ == "__main__":
    main()
