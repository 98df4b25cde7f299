"""Database size after 30 simulated days of a fleet's history (DESIGN §8 Storage).

The fleet: N machines polling once a minute, one deployment a day per machine (each
host its own system closure, as on NixOS, where the hostname is part of the system),
health flapping on 1 % of the machines (FLAPS_PER_DAY times a day, failing then
passing again). 30 days of one-minute polls are 43,200 polls per machine, 4.3 billion
at 100,000 machines; replaying them through HTTP would take days, and all but the
changes among them are heartbeats, which write no history. So the changes are written
set-based, with the very statements and shapes the control plane uses:

- desired generation: one UPDATE of machines per day, as a rollout's ticks issue it,
  and its desired events by store.history.add_desired, as the ticks write them;
- the switch the next report shows, and the health flaps: INSERT … SELECT of the rows
  record_report writes for them. That they are the same rows is checked here: a real
  record_report of a switch and of a flap, on a sample machine, must write exactly the
  row shapes (kind, source, generation, detail) the bulk statements wrote;
- heartbeats: HEARTBEATS real reports go through record_report at the end, and the
  growth they cause is recorded (none expected beyond the machine rows they rewrite);
- deployments (unless --no-deployments): each day's desired generations come from a
  release of every host (release_entries) and a completed rollout over the whole
  fleet (three batches: 1, 25 %, the rest; one rollout_machines row per machine in
  the shape store.rollouts.apply and the ticks leave it, prev_* included), with its
  events and audit rows written by store.rollouts.add_events. After each day the
  retention job (controlplane.retention.prune_deployments, default settings) runs at
  that day's time, as the control plane's background job would: with the default
  settings each finished rollout is condensed (its machines that ended healthy lose
  their rows) and each release nothing needs any more loses its entries, and the
  pages they free are reused by the next days' rows (`free_mib`: those pages at the
  end, part of the file: the file is as large as the most the days held at once).

Then the background pruning job runs once with the default settings (nothing is
older than 90 days, no machine has 1,000 events) and the file is measured after a
checkpoint: database plus WAL, not vacuumed.

    python bench/history_bench.py --machines 100000 --days 30 [--no-deployments]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import build_db
import fleet

from nixfleet import history as changes
from nixfleet import rollout
from nixfleet.controlplane.background import PruneHistory, prune_cache_changes, prune_history
from nixfleet.controlplane.retention import Pruned, prune_deployments
from nixfleet.history import EventKind
from nixfleet.models import HealthCheckResult, HealthResult, Report, isoformat
from nixfleet.settings import Settings
from nixfleet.store import Store, event_forms, history
from nixfleet.store import machines as store_machines
from nixfleet.store import rollouts as store_rollouts

FLAPS_PER_DAY = 3
HEARTBEATS = 20_000


def _settle(store: Store) -> None:
    """Copy the WAL back and truncate it, so the size measured is the database's own."""
    store.connection().execute("PRAGMA wal_checkpoint(TRUNCATE)")


def _size(path: Path) -> float:
    parts = (Path(str(path) + s) for s in ("", "-wal"))
    return sum(p.stat().st_size for p in parts if p.exists()) / 2**20


def _health(failing: bool) -> HealthResult:
    names = ("nginx", "postgresql", "disk-space")
    return HealthResult(
        all_passed=not failing,
        results=tuple(
            HealthCheckResult(n, "systemd", not (failing and n == "nginx"), 3, "active")
            for n in names
        ),
    )


def _flap_details() -> tuple[str, str]:
    """The stored detail record_report writes for a turn to failing and back."""
    ok, bad = (_health(f) for f in (False, True))
    gen = fleet.current_generation(0)

    def detail(before: HealthResult, after: HealthResult) -> str:
        prior = changes.Prior(gen, None, True, before)
        report = Report("x", datetime.now(UTC), gen, health=after)
        (event,) = changes.report_events(prior, report)
        return event_forms.encode_detail(event.kind, event.detail) or ""

    return detail(ok, _health(True)), detail(bad, _health(False))


def _next_seq(num: str) -> str:
    return f"coalesce((SELECT max(e.seq) FROM machine_events e WHERE e.machine = {num}), 0) + 1"


def _day(conn: Any, day: int, t0: datetime, failing: str, passing: str) -> None:
    start = t0 + timedelta(days=day)
    label = f"rollout:daily-{day:02d}"
    # Desired: what a rollout's ticks write (spread over the first hour of the day);
    # its desired events are written below, by the function the ticks use.
    conn.execute(
        "UPDATE machines SET desired_generation = '/nix/store/' || lower(hex(randomblob(16))) "
        "|| '-nixos-system-' || substr(id, 1, 7) || ?, desired_source = ?, "
        "desired_set_at = strftime('%Y-%m-%dT%H:%M:%f', ?, '+' || (abs(random()) % 3600) "
        "|| ' seconds') || '000Z'",
        (f"-24.11.{day:02d}", label, isoformat(start)[:19]),
    )
    # Its desired events, as the tick writes them (every machine's generation changed).
    history.add_desired(
        conn,
        "SELECT id AS machine_id, desired_set_at AS at, desired_source AS source, "
        "desired_generation AS generation FROM machines ORDER BY desired_set_at",
        (),
    )
    # The next report shows the switch: one generation event per machine, two minutes
    # on, referring to the desired event right before it for its path (k = 1).
    conn.execute(
        "INSERT INTO machine_events (machine, seq, at, kind, source, generation, detail) "
        f"SELECT n.num, {_next_seq('n.num')}, {event_forms.micros_sql('m.desired_set_at')} "
        "+ 120000000, ?, ?, 1, NULL FROM machines m "
        "JOIN machine_numbers n ON n.machine_id = m.id ORDER BY m.desired_set_at",
        (event_forms.KIND_CODES[EventKind.GENERATION], event_forms.AGENT),
    )
    conn.execute(
        "UPDATE machines SET current_generation = desired_generation, "
        "last_report_at = desired_set_at"
    )
    # Health flaps on 1 % of the machines: failing, then passing ten minutes later.
    for k in range(FLAPS_PER_DAY):
        at = start + timedelta(hours=4 + 6 * k)
        for offset, detail in ((0, failing), (600, passing)):
            conn.execute(
                "INSERT INTO machine_events (machine, seq, at, kind, source, generation, "
                f"detail) SELECT n.num, {_next_seq('n.num')}, ?, ?, ?, NULL, ? "
                "FROM machine_numbers n "
                "WHERE CAST(substr(n.machine_id, 2, 6) AS INTEGER) % 100 = 0",
                (
                    event_forms.micros(at + timedelta(seconds=offset)),
                    event_forms.KIND_CODES[EventKind.HEALTH],
                    event_forms.AGENT,
                    detail,
                ),
            )


def _deploy(conn: Any, day: int, start: datetime) -> None:
    """The day's release and its completed rollout over the fleet, as the CP stores them
    (run after the day's desired UPDATE: the release holds today's generations)."""
    label = f"daily-{day:02d}"
    release, rid = f"rel-{day:012x}", f"{label}-{day:08x}"
    at = isoformat(start)
    conn.execute(
        "INSERT INTO releases (id, flake_ref, flake_rev, cache_url, created_at, created_by) "
        "VALUES (?, 'github:example/fleet', ?, 'https://cache.example.com', ?, 'key:ci')",
        (release, f"{day:040x}", at),
    )
    conn.execute(
        "INSERT INTO release_entries (release_id, hostname, store_path, platform, tags_json) "
        "SELECT ?, id, desired_generation, 'x86_64-linux', tags_json FROM machines",
        (release,),
    )
    n = conn.execute("SELECT COUNT(*) FROM machines").fetchone()[0]
    sizes = [1, -(-n // 4), n - 1 - -(-n // 4)]
    done = isoformat(start + timedelta(hours=1))
    doc = {"version": 1, "name": label, "release": release, "target": {"tags": ["web"]}}
    conn.execute(
        "INSERT INTO rollouts (id, name, release_id, status, document_json, document_hash, "
        "skipped_json, source, created_at, created_by, updated_at) "
        "VALUES (?, ?, ?, 'completed', ?, ?, '[]', 'api', ?, 'key:ci', ?)",
        (rid, label, release, json.dumps(doc), f"{day:064x}", at, done),
    )
    conn.executemany(
        "INSERT INTO rollout_batches (rollout_id, idx, size, status, started_at, finished_at, "
        "started_until, judged_until) VALUES (?, ?, ?, 'succeeded', ?, ?, ?, ?)",
        [(rid, i, size, at, done, size, size) for i, size in enumerate(sizes)],
    )
    # prev_*: the generation before today's (yesterday's release entry; none on day 0).
    conn.execute(
        "INSERT INTO rollout_machines (rollout_id, machine_id, batch_idx, position, store_path, "
        "touched, prev_generation, prev_cache_url, prev_source, health, reason, healthy_since, "
        "decided_at) SELECT ?, m.id, CASE WHEN o.pos = 0 THEN 0 WHEN o.pos <= ? THEN 1 "
        "ELSE 2 END, o.pos, m.desired_generation, 1, p.store_path, "
        "'https://cache.example.com', ?, 'healthy', 'healthy', m.desired_set_at, ? "
        "FROM machines m JOIN (SELECT id, ROW_NUMBER() OVER (ORDER BY id) - 1 AS pos "
        "FROM machines) o ON o.id = m.id LEFT JOIN release_entries p "
        "ON p.release_id = ? AND p.hostname = m.id",
        (rid, sizes[1], f"rollout:daily-{day - 1:02d}", done, f"rel-{day - 1:012x}"),
    )
    events = [rollout.Event("rollout-created", detail={"name": label, "release": release})]
    for i, size in enumerate(sizes):
        events.append(rollout.Event("batch-started", i, detail={"size": size}))
        events.append(rollout.Event("batch-succeeded", i, detail={"healthy": size}))
    events.append(rollout.Event("rollout-completed"))
    store_rollouts.add_events(conn, rid, start, events, "reconciler")


def _shape(conn: Any, machine: str, n: int) -> list[tuple[Any, ...]]:
    """Newest first: kind, source, the path (None, "path" held, or k: k events back), detail."""
    rows = conn.execute(
        "SELECT e.kind, s.name, CASE WHEN typeof(e.generation) = 'text' THEN 'path' "
        "ELSE e.generation END, e.detail FROM machine_events e "
        "JOIN event_sources s ON s.id = e.source WHERE e.machine = "
        "(SELECT num FROM machine_numbers WHERE machine_id = ?) ORDER BY e.seq DESC LIMIT ?",
        (machine, n),
    )
    return [tuple(r) for r in rows]


def _check_shapes(store: Store, failing: str, passing: str) -> None:
    """A real switch and flap through record_report write what the bulk rows hold."""
    host = fleet.hostname(0)  # a flapping machine (0 % 100 == 0)
    with store.read() as conn:
        bulk = _shape(conn, host, 4)  # last day: ... flap, flap (newest first)
        day = _shape(conn, host, 2 * FLAPS_PER_DAY + 2)[-2:]  # generation, desired
    now = datetime.now(UTC)
    with store.transaction() as conn:
        store_machines.set_desired(conn, host, fleet.next_generation(0), None, "rollout:x", now)
    for k, (gen, health) in enumerate(
        [
            (fleet.next_generation(0), _health(False)),
            (fleet.next_generation(0), _health(True)),
            (fleet.next_generation(0), _health(False)),
        ]
    ):
        report = Report(host, now + timedelta(seconds=k + 1), gen, health=health)
        with store.transaction() as conn:
            store_machines.record_report(conn, report)
    with store.read() as conn:
        real = _shape(conn, host, 4)
    assert real[:2] == bulk[:2], (real, bulk)  # passing again, failing
    # the same kinds, sources (a rollout's label, the agent) and paths (held, referred to)
    shape = [(r[0], r[1].split(":")[0], r[2], r[3]) for r in real[2:]]
    assert shape == [(r[0], r[1].split(":")[0], r[2], r[3]) for r in day], (real, day)
    assert real[0][3] == passing and real[1][3] == failing
    assert real[2][2] == 1 and real[3][2] == "path"


def _largest(db: Path, n: int = 16) -> dict[str, float]:
    """The n largest tables and indexes in the file (SQLite's dbstat), MiB each."""
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute(
            "SELECT name, sum(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC LIMIT ?", (n,)
        ).fetchall()
    finally:
        conn.close()
    return {name: round(size / 2**20, 1) for name, size in rows}


def _free(db: Path) -> float:
    """Pages on the free list (freed by retention, reused by the next rows), MiB."""
    conn = sqlite3.connect(db)
    try:
        pages = conn.execute("PRAGMA freelist_count").fetchone()[0]
        size = conn.execute("PRAGMA page_size").fetchone()[0]
    finally:
        conn.close()
    return round(int(pages) * int(size) / 2**20, 1)


def _table_rows(store: Store) -> dict[str, int]:
    with store.read() as conn:
        return {
            t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
            for t in ("releases", "release_entries", "rollouts", "rollout_machines")
        }


def run(
    machines: int, days: int, workdir: Path, deployments: bool = True, keep: bool = False
) -> dict[str, Any]:
    db = workdir / f"history-{machines}.db"
    started = time.perf_counter()
    build_db.build(db, machines, 0, quiet=True)
    store = Store(db)
    prune_cache_changes(Settings(), store)  # as the background job does every tick
    _settle(store)
    base = _size(db)
    failing, passing = _flap_details()
    t0 = datetime.now(UTC) - timedelta(days=days + 1)
    retained = Pruned()
    retention_cpu = 0.0
    for day in range(days):
        with store.transaction() as conn:
            _day(conn, day, t0, failing, passing)
            if deployments:
                _deploy(conn, day, t0 + timedelta(days=day))
        prune_cache_changes(Settings(), store)  # the report cache's change list: bounded
        if deployments:  # the background job, at the end of that simulated day
            cpu = time.process_time()
            got = prune_deployments(Settings(), store, now=t0 + timedelta(days=day + 1))
            retention_cpu += time.process_time() - cpu
            for field in ("rollouts", "rollout_machines", "releases", "release_entries"):
                setattr(retained, field, getattr(retained, field) + getattr(got, field))
        store.checkpoint()
    _check_shapes(store, failing, passing)
    pruned = prune_history(Settings(), store, PruneHistory.MACHINES)
    _settle(store)
    filled = _size(db)
    with store.read() as conn:
        events = history.count(conn)
    rows = _table_rows(store)
    reporters = [i for i in range(machines) if build_db.reporting(i)]
    health = _health(False)
    now = datetime.now(UTC)
    with store.read() as conn:
        current = dict(conn.execute("SELECT id, current_generation FROM machines"))
    for k in range(HEARTBEATS):
        i = reporters[k % len(reporters)]
        host = fleet.hostname(i)
        report = Report(
            machine_id=host,
            received_at=now + timedelta(microseconds=k),
            current_generation=current[host],
            message="running",
            health=health if i % 100 else _health(False),
            tags=tuple(fleet.agent_tags(i)),
            agent_version="0.1.0",
            uptime_seconds=86_400 + k,
        )
        with store.transaction() as conn:
            store_machines.record_report(conn, report)
        if k % 1000 == 999:
            prune_cache_changes(Settings(), store)  # what the control plane's background
            store.checkpoint()  # job does
    _settle(store)
    after = _size(db)
    with store.read() as conn:
        events_after = history.count(conn)
    store.close()
    out = {
        "machines": machines,
        "days": days,
        "flaps_per_day": FLAPS_PER_DAY,
        "events": events,
        "pruned": pruned,
        "base_mib": base,
        "db_mib": filled,
        "history_mib": filled - base,
        "bytes_per_event": (filled - base) * 2**20 / max(events, 1),
        "heartbeats": HEARTBEATS,
        "heartbeat_events": events_after - events,
        "heartbeat_growth_mib": after - filled,
        "deployments": deployments,
        "retention": {
            k: getattr(Settings(), k)
            for k in ("rollout_detail_hours", "rollout_retention_days", "release_retention_days")
        },
        "free_mib": _free(db),
        "retention_pruned": vars(retained),
        "retention_cpu_seconds": retention_cpu,
        "rows_after": rows,
        "largest_mib": _largest(db),
        "seconds": time.perf_counter() - started,
    }
    if not keep:
        for suffix in ("", "-wal", "-shm"):
            Path(str(db) + suffix).unlink(missing_ok=True)
    print(
        f"  history {machines:,} machines x {days} days: {filled:.0f} MiB "
        f"({base:.0f} MiB without history; {events:,} events, "
        f"{out['bytes_per_event']:.0f} B each); {HEARTBEATS:,} heartbeats: "
        f"+{events_after - events} events, +{after - filled:.1f} MiB",
        file=sys.stderr,
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machines", type=int, default=100_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp"))
    parser.add_argument(
        "--no-deployments",
        action="store_true",
        help="history only: no daily release and rollout rows (the session-4 figure)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the database to inspect it")
    args = parser.parse_args()
    out = run(
        args.machines, args.days, args.workdir, deployments=not args.no_deployments, keep=args.keep
    )
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
