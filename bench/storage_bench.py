"""Database size with report history at its retention bound.

At one poll a minute a machine sends 1,440 reports a day, but the report path prunes
each machine's history to `retention` rows in the same transaction, so a day's
worth of reports leaves exactly the bound: machines x retention rows. We fill the
history to the bound with bulk inserts, then push more reports through the real
record_report (with pruning) and show that the file stops growing: the freed pages
are reused.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import build_db
import fleet

from nixfleet.models import HealthResult, Report, utcnow
from nixfleet.store import Store
from nixfleet.store import machines as store_machines


def _size(path: Path) -> float:
    return (
        sum(
            Path(str(path) + s).stat().st_size for s in ("", "-wal") if Path(str(path) + s).exists()
        )
        / 2**20
    )


def run(machines: int, retention: int, workdir: Path, extra: int = 20_000) -> dict[str, Any]:
    db = workdir / f"storage-{machines}.db"
    t0 = time.perf_counter()
    build_db.build(db, machines, retention, quiet=True)
    store = Store(db)
    store.connection().execute("PRAGMA wal_checkpoint(TRUNCATE)")
    full = _size(db)
    rows = store.connection().execute("SELECT COUNT(*) FROM reports").fetchone()[0]
    reporters = [i for i in range(machines) if build_db.reporting(i)]
    health = HealthResult.from_dict(fleet.HEALTH)
    for k in range(extra):
        i = reporters[k % len(reporters)]
        report = Report(
            machine_id=fleet.hostname(i),
            received_at=utcnow(),
            current_generation=fleet.current_generation(i),
            message="running",
            health=health,
            tags=tuple(fleet.agent_tags(i)),
            agent_version="0.1.0",
            uptime_seconds=86_400 + i,
        )
        with store.transaction() as conn:
            store_machines.record_report(conn, report, retention)
    store.connection().execute("PRAGMA wal_checkpoint(TRUNCATE)")
    after = _size(db)
    rows_after = store.connection().execute("SELECT COUNT(*) FROM reports").fetchone()[0]
    store.close()
    out = {
        "retention": retention,
        "report_rows": rows,
        "report_rows_after": rows_after,
        "db_mib": full,
        "growth_mib": after - full,
        "extra_reports": extra,
        "bytes_per_report_row": full * 2**20 / max(rows, 1),
        "seconds": time.perf_counter() - t0,
    }
    db.unlink()
    print(
        f"  storage {full:.0f} MiB at {rows:,} rows; +{after - full:.1f} MiB after {extra:,} "
        f"more reports ({rows_after:,} rows)",
        file=sys.stderr,
    )
    return out
