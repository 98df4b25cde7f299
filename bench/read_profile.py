"""The read path's CPU at fleet scale, in process: the status document, its counts,
/metrics and the dashboard's fleet page, each as the API serves it.

Wall-clock figures of bench/run.py and bench/dashboard_bench.py move with the host
(a shared VM's stolen time made identical requests vary 2x in session 6); the CPU
time of this process does not, so this script is the one to compare two trees
with. Each figure is the median of --runs calls of time.process_time, after a warm-up.
The requests go through the real Falcon app (falcon.testing, no sockets), so
authentication, the store's read transaction and the JSON splice are included;
the transfer is not (bench/run.py measures it).

    python bench/read_profile.py --db /tmp/fleet.db             # a bench/build_db.py fleet
    python bench/read_profile.py --machines 100000 --runs 5     # builds one first
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import build_db
import falcon.testing

from nixfleet.api.app import create_app
from nixfleet.filters import MachineFilter
from nixfleet.models import isoformat, stale_cutoff, utcnow
from nixfleet.settings import Settings
from nixfleet.store import Store, credentials, fleet, status


def cpu_ms(fn: Callable[[], Any], runs: int) -> float:
    fn()  # warm: page cache, statement cache
    times = []
    for _ in range(runs):
        c0 = time.process_time()
        fn()
        times.append(time.process_time() - c0)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", type=Path, help="an existing bench database (else one is built)")
    parser.add_argument("--machines", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    db = args.db
    if db is None:
        db = Path(tempfile.mkdtemp(prefix="nixfleet-read-")) / "fleet.db"
        build_db.build(db, args.machines, 1)
    store = Store(db)
    with store.transaction() as conn:
        key = credentials.create_key(conn, f"read-{time.time_ns()}", "readonly", "bench", utcnow())
    client = falcon.testing.TestClient(create_app(Settings(db=str(db)), store))
    auth = {"Authorization": f"Bearer {key}"}

    def get(path: str) -> Callable[[], Any]:
        def call() -> None:
            answer = client.simulate_get(path, headers=auth)
            assert answer.status_code == 200, (path, answer.status_code, answer.text[:300])

        return call

    now, stale_after = utcnow(), Settings().stale_after
    cutoff = isoformat(stale_cutoff(now, stale_after))

    def in_read(fn: Callable[[Any], Any]) -> Callable[[], Any]:
        def call() -> None:
            with store.read() as conn:
                fn(conn)

        return call

    views = {
        "GET /api/v1/status": get("/api/v1/status"),
        "  status_document": in_read(
            lambda c: status.status_document(c, MachineFilter(), now, stale_after)
        ),
        "  counts (the summary)": in_read(lambda c: status.counts(c, "", [], cutoff)),
        "GET /metrics": get("/metrics"),
        "fleet page: first": in_read(lambda c: fleet.page(c, fleet.FleetQuery(), now, stale_after)),
        "fleet page: tags web,!rack-007": in_read(
            lambda c: fleet.page(
                c, fleet.FleetQuery(tags=("web",), not_tags=("rack-007",)), now, stale_after
            )
        ),
        "fleet page: sort by health": in_read(
            lambda c: fleet.page(c, fleet.FleetQuery(sort="health"), now, stale_after)
        ),
    }
    with store.read() as conn:
        machines = conn.execute("SELECT count(*) FROM machines").fetchone()[0]
    print(f"read path, {machines:,} machines, CPU ms (median of {args.runs})")
    for name, fn in views.items():
        print(f"{name:34} {cpu_ms(fn, args.runs):8.0f}")
    store.close()


if __name__ == "__main__":
    main()
