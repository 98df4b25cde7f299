"""Benchmarks for DESIGN §8, run by hand (never by CI): python bench/run.py [options].

For each fleet size it builds a fresh database, starts the real control plane
(`python -m nixfleet.controlplane.main`) and a bare Falcon/waitress yardstick, and
measures from separate load-generator processes on 127.0.0.1:

  report    POST /api/v1/machines/{id}/report req/s and p50/p99 of heartbeats and of
            state-changing reports, vs the yardstick, alternating within each run
  status    GET /api/v1/status (client-side wall time, whole body read)
  cli       `nixfleet status --json` end to end (process start to exit)
  tick      one reconciler tick over a rollout of every machine (when it exists)
  storage   database size after 30 simulated days of history (bench/history_bench.py)
  agent     nixfleet-agent RSS and CPU per poll against the control plane
  postgresql  bench/pg_bench.py: reports (1 and 2 replicas), status and the tick on
            PostgreSQL beside SQLite, in one run (needs Debian's postgresql binaries)

Every figure is the median of --runs runs. Results go to stdout as a table and to
bench/results/<machines>.json (<machines>-workers<N>.json with --workers N).

    python bench/run.py --machines 100000 --runs 3
    python bench/run.py --machines 1000,10000,100000 --only report,status,cli
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

import build_db  # noqa: E402
import fleet  # noqa: E402
import load  # noqa: E402

PHASES = ("report", "status", "cli", "tick", "storage")  # agent: --only agent (needs Nix)
OPTIONAL = ("agent", "postgresql")  # only when named in --only


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Server:
    """A server process on 127.0.0.1 that is ready once /health answers."""

    def __init__(self, args: list[str], port: int, log: Path) -> None:
        self.port = port
        self.log = log
        self.proc = subprocess.Popen(
            args,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    conn.close()
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"server on {port} did not start")

    def pids(self) -> list[int]:
        """The server and its worker processes."""
        pid = self.proc.pid
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return [pid, *map(int, kids)]

    def cpu_seconds(self) -> float:
        total = 0
        for pid in self.pids():
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def rss_mib(self) -> float:
        total = 0
        for pid in self.pids():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        return total / 1024

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def get(port: int, path: str, key: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("GET", path, headers={"Authorization": f"Bearer {key}"})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, body


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


# --- phases ---------------------------------------------------------------------------


def wait_for_report_cache(cp: Server, db: Path, reporters: list[int], workers: int) -> float:
    """Until every server process answers heartbeats from memory (its view is loaded).

    A heartbeat answered from memory commits nothing, so `PRAGMA data_version` of a
    connection of our own does not move across it (a flush of earlier ones might:
    retried). Each fresh connection lands on some process; 8 in a row per worker.
    """
    import sqlite3

    watch = sqlite3.connect(db)

    def counter() -> int:
        return int(watch.execute("PRAGMA data_version").fetchone()[0])

    t0 = time.monotonic()
    streak = 0
    k = 0
    while streak < 8 * workers and time.monotonic() - t0 < 60:
        i = reporters[k % len(reporters)]
        k += 1
        conn = http.client.HTTPConnection("127.0.0.1", cp.port, timeout=30)
        before = counter()
        conn.request(
            "POST",
            f"/api/v1/machines/{fleet.hostname(i)}/report",
            fleet.report_bytes(i),
            {"Authorization": f"Bearer {fleet.token(i)}", "Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        resp.read()
        conn.close()
        streak = streak + 1 if counter() == before and resp.status == 200 else 0
        if not streak:
            time.sleep(0.3)
    return time.monotonic() - t0


def bench_report(
    cp: Server, bare: Server, machines: int, runs: int, args: argparse.Namespace, db: Path
) -> dict[str, Any]:
    """Yardstick, heartbeats and state-changing reports, alternating within each run.

    Heartbeats come from even-numbered machines (whose state the database holds),
    changes from odd-numbered ones (each run a new message, health turning every
    other run), so no run's reports are another's leftovers.
    """
    reporters = [i for i in range(machines) if build_db.reporting(i)]
    steady = [i for i in reporters if i % 2 == 0]
    changing = [i for i in reporters if i % 2 == 1]
    loaded = wait_for_report_cache(cp, db, steady, args.workers)
    print(f"  report cache loaded after {loaded:.1f} s", file=sys.stderr)
    kw = {
        "processes": args.load_processes,
        "threads": args.load_threads,
        "duration": args.duration,
        "max_requests": args.max_requests,
    }
    targets: list[tuple[str, Server, list[int], bool]] = [
        ("bare", bare, steady, False),
        ("heartbeat", cp, steady, False),
        ("change", cp, changing, True),
    ]
    rows: list[dict[str, Any]] = []
    offsets = {name: 0 for name, *_ in targets}
    for run in range(runs):
        for name, server, fleet_part, change in targets:
            nonce = run * 2 + 1 if change else None
            # Warm-up (connections, caches, the first-use work) is not measured.
            warm = {**kw, "duration": 1.0, "offset": offsets[name]}
            load.run(server.port, fleet_part, **warm, change=nonce)
            offsets[name] += 2_000
            cpu0 = server.cpu_seconds()
            res = load.run(server.port, fleet_part, **kw, offset=offsets[name], change=nonce)
            cpu = server.cpu_seconds() - cpu0
            offsets[name] += res.requests
            rows.append(
                {
                    "run": run,
                    "target": name,
                    "requests": res.requests,
                    "errors": res.errors,
                    "rps": res.rps,
                    "p50_ms": res.p50_ms,
                    "p99_ms": res.p99_ms,
                    "server_cpu_us_per_req": cpu / max(res.requests, 1) * 1e6,
                    "client_cpu_us_per_req": res.client_cpu_s / max(res.requests, 1) * 1e6,
                }
            )
            print(
                f"  run {run} {name:9s} {res.rps:8.0f} req/s  p50 {res.p50_ms:6.2f} ms  "
                f"p99 {res.p99_ms:6.2f} ms  errors {res.errors}  "
                f"server {rows[-1]['server_cpu_us_per_req']:.0f} us/req",
                file=sys.stderr,
            )
    out: dict[str, Any] = {"runs": rows}
    for name, *_ in targets:
        sel = [r for r in rows if r["target"] == name]
        out[name] = {
            k: median([r[k] for r in sel])
            for k in ("rps", "p50_ms", "p99_ms", "server_cpu_us_per_req", "client_cpu_us_per_req")
        }
    bares = [x for x in rows if x["target"] == "bare"]
    for name in ("heartbeat", "change"):
        ratios = [
            r["rps"] / b["rps"]
            for b, r in zip(bares, [x for x in rows if x["target"] == name], strict=True)
        ]
        out[f"{name}_ratio"] = median(ratios)
        out[f"{name}_ratios"] = ratios
    return out


def churn(db: Path, run: int, changed: int = 1000) -> None:
    """A minute of the fleet, written beside the running control plane as its workers
    would: every machine's heartbeat time (one batch), and `changed` state changes."""
    from nixfleet.models import isoformat, utcnow
    from nixfleet.store import Store
    from nixfleet.store import report_cache as rc

    store = Store(db)
    try:
        with store.transaction() as conn:
            ids = [r[0] for r in conn.execute("SELECT id FROM machines ORDER BY id")]
            at = isoformat(utcnow())
            rc.write_last_seen(conn, [(i, at, 60 * run) for i in ids])
        with store.transaction() as conn:  # the trigger lists each in cache_changes
            conn.executemany(
                "UPDATE machines SET last_message = ? WHERE id = ?",
                [(f"churn {run}", i) for i in ids[run :: max(1, len(ids) // changed)]],
            )
    finally:
        store.close()


def bench_status(
    cp: Server, key: str, runs: int, machines: int, db: Path | None = None
) -> dict[str, Any]:
    """The whole fleet's status; with `db` (SQLite's file) also after a minute of it."""
    times = []
    size = 0
    # The first request of a process loads every entry (api.status_view), and warms
    # the page cache and the code paths.
    first, _ = timed(lambda: get(cp.port, "/api/v1/status", key))
    for _ in range(runs):
        seconds, (status, body) = timed(lambda: get(cp.port, "/api/v1/status", key))
        if status != 200:
            raise RuntimeError(f"/api/v1/status answered {status}: {body[:300]!r}")
        times.append(seconds)
        size = len(body)
    doc = json.loads(body)
    # every machine listed; decommissioned ones are not counted in the summary's total
    s = doc["summary"]
    assert len(doc["machines"]) == machines, s
    assert s["total"] == machines - s["by_lifecycle"]["decommissioned"], s
    print(f"  status {median(times) * 1000:.0f} ms ({size / 2**20:.1f} MiB)", file=sys.stderr)
    # The same document written by the database (any order but the default's is): the
    # same-run yardstick of what the kept view saves.
    by_sql = []
    for _ in range(runs):
        seconds, (status, body) = timed(lambda: get(cp.port, "/api/v1/status?dir=desc", key))
        if status != 200 or len(body) != size:
            raise RuntimeError(f"/api/v1/status?dir=desc answered {status}: {body[:300]!r}")
        by_sql.append(seconds)
    churned = []
    for run in range(runs if db is not None else 0):
        assert db is not None
        churn(db, run + 1)
        seconds, (status, body) = timed(lambda: get(cp.port, "/api/v1/status", key))
        if status != 200:
            raise RuntimeError(f"/api/v1/status answered {status}: {body[:300]!r}")
        churned.append(seconds)
    after = f"after a minute of the fleet {median(churned) * 1000:.0f} ms, " if churned else ""
    print(
        f"  status {after}first request {first * 1000:.0f} ms, written by the database "
        f"{median(by_sql) * 1000:.0f} ms",
        file=sys.stderr,
    )
    return {
        "seconds": median(times),
        "all": times,
        "bytes": size,
        "first_seconds": first,
        "churned_seconds": median(churned) if churned else None,
        "churned_all": churned,
        "sql_seconds": median(by_sql),
        "sql_all": by_sql,
    }


def bench_cli(cp: Server, key: str, runs: int) -> dict[str, Any]:
    times = []
    cmd = [
        sys.executable,
        "-m",
        "nixfleet.cli",
        "--control-plane-url",
        f"http://127.0.0.1:{cp.port}",
        "status",
        "--json",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NIXFLEET_API_KEY": key}
    for _ in range(runs):
        with tempfile.TemporaryFile() as out:
            seconds, proc = timed(
                lambda out=out: subprocess.run(
                    cmd, stdout=out, stderr=subprocess.PIPE, env=env, check=False
                )
            )
            if proc.returncode != 0:
                raise RuntimeError(f"nixfleet status failed: {proc.stderr.decode()[-500:]}")
        times.append(seconds)
    print(f"  cli    {median(times) * 1000:.0f} ms", file=sys.stderr)
    return {"seconds": median(times), "all": times}


def bench_tick(db: Path, machines: int, runs: int) -> dict[str, Any]:
    import rollout_bench

    return rollout_bench.run(db, machines, runs)


def bench_storage(machines: int, days: int, workdir: Path) -> dict[str, Any]:
    import history_bench

    return history_bench.run(machines, days, workdir)


def bench_agent(cp: Server, key: str, workdir: Path, polls: int) -> dict[str, Any]:
    import agent_bench

    return agent_bench.run(cp.port, key, workdir, polls)


# --- driver ---------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    import sqlite3

    import falcon
    import waitress

    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "falcon": falcon.__version__,
        "waitress": getattr(waitress, "__version__", "3"),
        "kernel": platform.release(),
    }


def bench_postgresql(machines: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """bench/pg_bench.py in its own process (its cluster and servers are its own);
    its whole result is in bench/results/pg-<machines>.json, the ratios here."""
    subprocess.run(
        [
            sys.executable,
            str(BENCH / "pg_bench.py"),
            "--machines",
            str(machines),
            "--runs",
            str(args.runs),
            "--events",
            str(args.events),
            "--workdir",
            str(workdir / "postgresql"),
        ],
        check=True,
    )
    pg = json.loads((BENCH / "results" / f"pg-{machines}.json").read_text())
    report = pg["report"]
    return {
        "heartbeat_replica_ratio": report["heartbeat_replica_ratio"],
        "change_replica_ratio": report["change_replica_ratio"],
        "change_postgresql_2_rps": report["change_postgresql-2_rps"],
        "status_sqlite_s": pg["status_sqlite"]["seconds"],
        "status_postgresql_s": pg["status_postgresql"]["seconds"],
        "tick_sqlite_s": pg["tick_sqlite"]["seconds"],
        "tick_postgresql_s": pg["tick_postgresql"]["seconds"],
    }


def run_size(machines: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    print(f"== {machines} machines", file=sys.stderr)
    result: dict[str, Any] = {"machines": machines}
    if "postgresql" in args.only:
        result["postgresql"] = bench_postgresql(machines, args, workdir)
        if not args.only & (set(PHASES + OPTIONAL) - {"postgresql"}):
            return result
    db = workdir / f"fleet-{machines}.db"
    key = build_db.build(db, machines, args.events)
    cp_port, bare_port = free_port(), free_port()
    settings = workdir / "settings.json"
    settings.write_text(json.dumps({"threads": args.threads, "workers": args.workers}))
    cp = Server(
        [
            sys.executable,
            "-m",
            "nixfleet.controlplane.main",
            "--log-level",
            "warning",
            "--db",
            str(db),
            "--config",
            str(settings),
            "--listen",
            f"127.0.0.1:{cp_port}",
        ],
        cp_port,
        workdir / "cp.log",
    )
    bare = Server(
        [
            sys.executable,
            str(BENCH / "bare_server.py"),
            "--listen",
            f"127.0.0.1:{bare_port}",
            "--threads",
            str(args.threads),
            "--workers",
            str(args.workers),
        ],
        bare_port,
        workdir / "bare.log",
    )
    try:
        if "report" in args.only:
            result["report"] = bench_report(cp, bare, machines, args.runs, args, db)
        bare.stop()
        if "status" in args.only:
            result["status"] = bench_status(cp, key, args.runs, machines, db)
        if "cli" in args.only:
            result["cli"] = bench_cli(cp, key, args.runs)
        if "agent" in args.only:
            result["agent"] = bench_agent(cp, key, workdir, args.agent_polls)
        result["cp_rss_mib"] = cp.rss_mib()
    finally:
        cp.stop()
        if bare.proc.poll() is None:
            bare.stop()
    if "tick" in args.only:
        result["tick"] = bench_tick(db, machines, args.runs)
    if "storage" in args.only:
        measured = min(machines, args.storage_machines)
        st = bench_storage(measured, args.history_days, workdir)
        st["measured_machines"] = measured
        st["extrapolated_mib"] = st["db_mib"] * machines / measured
        result["storage"] = st
    return result


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| machines | measure | result | budget |", "|---:|---|---:|---|"]
    for r in results:
        n = f"{r['machines']:,}"
        if "report" in r:
            rep = r["report"]
            for name, label, budget in (
                ("bare", "bare Falcon/waitress", ""),
                ("heartbeat", "heartbeat report", ""),
                ("change", "state-changing report", ""),
            ):
                lines.append(
                    f"| {n} | {label} req/s (p50 / p99 ms) | {rep[name]['rps']:.0f} "
                    f"({rep[name]['p50_ms']:.2f} / {rep[name]['p99_ms']:.2f}) | {budget} |"
                )
            lines.append(
                f"| {n} | heartbeat / bare | {rep['heartbeat_ratio'] * 100:.0f} % | ≥ 60 % |"
            )
            lines.append(
                f"| {n} | state-changing report / bare | {rep['change_ratio'] * 100:.0f} % "
                "| ≥ 35 % |"
            )
            lines.append(
                f"| {n} | server CPU per request, bare / heartbeat / change | "
                f"{rep['bare']['server_cpu_us_per_req']:.0f} / "
                f"{rep['heartbeat']['server_cpu_us_per_req']:.0f} / "
                f"{rep['change']['server_cpu_us_per_req']:.0f} µs | |"
            )
        if "status" in r:
            lines.append(
                f"| {n} | GET /api/v1/status | {r['status']['seconds'] * 1000:.0f} ms "
                f"({r['status']['bytes'] / 2**20:.1f} MiB) | < 500 ms |"
            )
            if r["status"].get("churned_seconds"):
                lines.append(
                    f"| {n} | GET /api/v1/status after a minute of the fleet "
                    f"(every heartbeat, 1,000 changes) | "
                    f"{r['status']['churned_seconds'] * 1000:.0f} ms | < 500 ms |"
                )
                lines.append(
                    f"| {n} | GET /api/v1/status?dir=desc (written by the database) | "
                    f"{r['status']['sql_seconds'] * 1000:.0f} ms | |"
                )
                lines.append(
                    f"| {n} | GET /api/v1/status, a process's first | "
                    f"{r['status']['first_seconds'] * 1000:.0f} ms | |"
                )
        if "cli" in r:
            lines.append(
                f"| {n} | nixfleet status --json | {r['cli']['seconds'] * 1000:.0f} ms | < 1 s |"
            )
        tick = r.get("tick")
        if tick and tick.get("available"):
            slowest = ", ".join(
                f"{p} {tick[p + '_s'] * 1000:.0f}" for p in ("start", "judge", "complete", "revert")
            )
            lines.append(
                f"| {n} | reconciler tick, slowest ({slowest} ms) | "
                f"{tick['seconds'] * 1000:.0f} ms | < 250 ms |"
            )
        elif tick:
            lines.append(f"| {n} | reconciler tick | pending: {tick['reason']} | < 250 ms |")
        st = r.get("storage")
        if st:
            lines.append(
                f"| {n} | database after {st['days']} days of history"
                f" | {st['extrapolated_mib']:,.0f} MiB (measured "
                f"{st['db_mib']:.0f} MiB at {st['measured_machines']:,} machines, "
                f"{st['events']:,} events; +{st['heartbeat_events']} events after "
                f"{st['heartbeats']:,} heartbeats) | ≤ 500 MiB |"
            )
        pg = r.get("postgresql")
        if pg:
            lines.append(
                f"| {n} | PostgreSQL replica / SQLite, heartbeat / change reports | "
                f"{pg['heartbeat_replica_ratio'] * 100:.0f} % / "
                f"{pg['change_replica_ratio'] * 100:.0f} % | ≥ 70 % |"
            )
            lines.append(
                f"| {n} | GET /api/v1/status, SQLite / PostgreSQL | "
                f"{pg['status_sqlite_s'] * 1000:.0f} / {pg['status_postgresql_s'] * 1000:.0f} ms "
                "| < 500 ms |"
            )
            lines.append(
                f"| {n} | slowest tick, SQLite / PostgreSQL | {pg['tick_sqlite_s'] * 1000:.0f} / "
                f"{pg['tick_postgresql_s'] * 1000:.0f} ms | < 250 ms |"
            )
        ag = r.get("agent")
        if ag:
            lines.append(
                f"| {n} | agent idle RSS / CPU per poll | {ag['rss_mib']:.1f} MiB / "
                f"{ag['cpu_ms_per_poll']:.1f} ms | |"
            )
        if "cp_rss_mib" in r:
            rss = r["cp_rss_mib"]
            lines.append(f"| {n} | control-plane RSS after the runs | {rss:.0f} MiB | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--machines", default="100000", help="fleet sizes, comma-separated")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default=",".join(PHASES), help=f"subset of {PHASES + OPTIONAL}")
    parser.add_argument("--events", type=int, default=3, help="history events per machine")
    parser.add_argument("--history-days", type=int, default=30, help="simulated days (storage)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per report run")
    parser.add_argument("--max-requests", type=int, default=40_000)
    parser.add_argument(
        "--threads", type=int, default=8, help="waitress threads of both servers (Settings.threads)"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="server processes of both servers (Settings.workers)"
    )
    parser.add_argument("--load-processes", type=int, default=2)
    parser.add_argument("--load-threads", type=int, default=4)
    parser.add_argument("--agent-polls", type=int, default=20)
    parser.add_argument(
        "--storage-machines",
        type=int,
        default=10_000,
        help="fleet size of the history fill (extrapolated linearly to --machines)",
    )
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    args.only = set(args.only.split(","))
    sizes = [int(x) for x in args.machines.split(",")]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="nixfleet-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    print(f"machine: {info}", file=sys.stderr)
    results = [run_size(n, args, workdir) for n in sizes]
    out_dir = BENCH / "results"
    out_dir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for r in results:
        # Merge: a run of some phases (--only) keeps the other phases' last results.
        suffix = f"-workers{args.workers}" if args.workers > 1 else ""
        path = out_dir / f"{r['machines']}{suffix}.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        new = {**old, "at": stamp, "machine": info, **{k: v for k, v in r.items()}}
        new.setdefault("args", {})
        new["args"] = {
            **(new["args"] if isinstance(new["args"], dict) else {}),
            **{phase: sys.argv[1:] for phase in r if phase in PHASES + OPTIONAL},
        }
        path.write_text(json.dumps(new, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
