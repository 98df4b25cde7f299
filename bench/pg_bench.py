"""PostgreSQL beside SQLite in one run (DESIGN §13): reports, status and the tick.

One fleet (bench/build_db.py) in an SQLite file and, copied by migrate-db, in a
PostgreSQL database of a throwaway cluster started here (tests/postgres_cluster.py,
fsync on and synchronous_commit off: the promise of SQLite's WAL at
synchronous=NORMAL, which the SQLite store runs). Then, alternating within each run
so that both see the same host:

  report    heartbeats (answered from memory) and state-changing reports per second,
            one SQLite process against one PostgreSQL replica, and two PostgreSQL
            replicas (two processes on this host, each loaded by its own generator)
  status    GET /api/v1/status, the whole fleet
  tick      bench/rollout_bench.py's rollout life on each backend (slowest tick)

The load generators run on the same cores as the servers and the database (one
host), as in bench/run.py; the ratios are what this records (docs/scaling.md).

    python bench/pg_bench.py --machines 100000 --runs 3 --workdir /tmp/pgbench
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import build_db
import load
import rollout_bench
from postgres_cluster import Cluster, bin_dir
from run import Server, bench_status, free_port

from nixfleet.store.conn import AnyStore
from nixfleet.store.migrate_db import migrate
from nixfleet.store.pg import PgStore

BENCH = Path(__file__).resolve().parent


def start(workdir: Path, name: str, database: list[str], threads: int) -> Server:
    port = free_port()
    settings = workdir / f"{name}.json"
    settings.write_text(json.dumps({"threads": threads, "workers": 1}))
    log = workdir / f"{name}.log"
    log.unlink(missing_ok=True)
    server = Server(
        [
            sys.executable,
            "-m",
            "nixfleet.controlplane.main",
            "--log-level",
            "info",
            *database,
            "--config",
            str(settings),
            "--listen",
            f"127.0.0.1:{port}",
        ],
        port,
        log,
    )
    deadline = time.monotonic() + 300
    while "report cache:" not in log.read_text(errors="replace"):  # the view is loaded
        if time.monotonic() > deadline or server.proc.poll() is not None:
            raise RuntimeError(f"{name} did not load its report cache: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    return server


def report_run(
    servers: list[Server], parts: list[list[int]], args: argparse.Namespace, change: int | None
) -> dict[str, float]:
    """One measured run: every server loaded at once by its own generator; rps summed."""
    results: list[load.LoadResult] = []
    kw = {
        "processes": args.load_processes,
        "threads": args.load_threads,
        "duration": args.duration,
        "max_requests": args.max_requests,
        "change": change,
    }

    def drive(server: Server, part: list[int], offset: int) -> None:
        load.run(server.port, part, **{**kw, "duration": 1.0, "offset": offset})  # warm-up
        results.append(load.run(server.port, part, **kw, offset=offset + 2_000))

    threads = [
        threading.Thread(target=drive, args=(s, p, 7_000 * (change or 0)))
        for s, p in zip(servers, parts, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        "rps": sum(r.rps for r in results),
        "p99_ms": max(r.p99_ms for r in results),
        "errors": sum(r.errors for r in results),
    }


def bench_reports(
    sqlite: Server, pg: list[Server], machines: int, args: argparse.Namespace
) -> dict[str, Any]:
    reporters = [i for i in range(machines) if build_db.reporting(i)]
    steady = [i for i in reporters if i % 2 == 0]
    changing = [i for i in reporters if i % 2 == 1]
    halves = lambda ids: [ids[0::2], ids[1::2]]  # noqa: E731
    rows: list[dict[str, Any]] = []
    for run in range(args.runs):
        for kind, ids in (("heartbeat", steady), ("change", changing)):
            nonce = run * 2 + 1 if kind == "change" else None
            for target, servers, parts in (
                ("sqlite", [sqlite], [ids]),
                ("postgresql", pg[:1], [ids]),
                ("postgresql-2", pg, halves(ids)),
            ):
                r = report_run(servers, parts, args, nonce)
                rows.append({"run": run, "kind": kind, "target": target, **r})
                print(
                    f"  run {run} {kind:9s} {target:12s} {r['rps']:7.0f} req/s  "
                    f"p99 {r['p99_ms']:6.1f} ms  errors {r['errors']}",
                    file=sys.stderr,
                )
    out: dict[str, Any] = {"runs": rows}
    for kind in ("heartbeat", "change"):
        for target in ("sqlite", "postgresql", "postgresql-2"):
            sel = [r for r in rows if r["kind"] == kind and r["target"] == target]
            out[f"{kind}_{target}_rps"] = statistics.median(r["rps"] for r in sel)
        lite = [r["rps"] for r in rows if r["kind"] == kind and r["target"] == "sqlite"]
        one = [r["rps"] for r in rows if r["kind"] == kind and r["target"] == "postgresql"]
        out[f"{kind}_replica_ratio"] = statistics.median(
            p / s for p, s in zip(one, lite, strict=True)
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--machines", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--events", type=int, default=3, help="history events per machine")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per report run")
    parser.add_argument("--max-requests", type=int, default=40_000)
    parser.add_argument("--threads", type=int, default=8, help="server threads")
    parser.add_argument("--load-processes", type=int, default=2)
    parser.add_argument("--load-threads", type=int, default=4)
    parser.add_argument("--only", default="report,status,tick")
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    binaries = bin_dir()
    if binaries is None:
        raise SystemExit("no PostgreSQL binaries (apt-get install postgresql)")
    db = args.workdir / f"fleet-{args.machines}.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    key = build_db.build(db, args.machines, args.events)
    # The tick's rollouts start from the fleet as built, not as the report runs left it
    # (their failures would pause the first rollout on a small fleet).
    pristine = args.workdir / f"fleet-{args.machines}-pristine.db"
    shutil.copyfile(db, pristine)
    cluster = Cluster(binaries, durable=True)
    server = cluster.start()
    result: dict[str, Any] = {"machines": args.machines}
    try:
        url = server.create_database()
        t0 = time.monotonic()
        migrate(db, url)
        result["migrate_db_s"] = time.monotonic() - t0
        print(f"  migrate-db {result['migrate_db_s']:.1f} s", file=sys.stderr)
        if "report" in args.only or "status" in args.only:
            sqlite = start(args.workdir, "sqlite", ["--db", str(db)], args.threads)
            pg = [
                start(args.workdir, f"pg{i}", ["--database-url", url], args.threads)
                for i in range(2)
            ]
            try:
                if "report" in args.only:
                    result["report"] = bench_reports(sqlite, pg, args.machines, args)
                if "status" in args.only:
                    result["status_sqlite"] = bench_status(sqlite, key, args.runs, args.machines)
                    result["status_postgresql"] = bench_status(pg[0], key, args.runs, args.machines)
            finally:
                for s in (sqlite, *pg):
                    s.stop()
        if "tick" in args.only:
            result["tick_sqlite"] = rollout_bench.run(pristine, args.machines, args.runs)

            def fresh(source: Path) -> AnyStore:
                target = server.create_database()
                migrate(source, target)
                return PgStore(target, max_size=2)

            result["tick_postgresql"] = rollout_bench.run(pristine, args.machines, args.runs, fresh)
    finally:
        cluster.stop()
    out = BENCH / "results" / f"pg-{args.machines}.json"
    # Merge: a run of some phases (--only) keeps the other phases' last results.
    kept = json.loads(out.read_text()) if out.exists() else {}
    out.write_text(json.dumps({**kept, **result}, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "report"}, indent=2))
    if "report" in result:
        print(json.dumps({k: v for k, v in result["report"].items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
