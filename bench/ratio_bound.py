"""How much of the bare yardstick a report can keep once it touches SQLite at all.

Starts the yardstick (bench/bare_server.py) four times over one fleet database,
with no work, with the control plane's token look-up (one indexed SELECT through
nixfleet's Store), with that look-up plus a one-row write transaction, and with
the transaction alone (`commit`: the token known from memory, as the report cache
knows it), and drives them in alternation with the load generator, median of
--runs runs. No state-changing report can do less than `commit` (DESIGN §1: one
transaction per report), so its ratio bounds what any report path on this stack
can reach.

    python bench/ratio_bound.py --machines 10000 --runs 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import build_db  # noqa: E402
import load  # noqa: E402
import run  # noqa: E402

WORK = ("none", "lookup", "write", "commit")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--machines", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="nixfleet-bound-"))
    db = workdir / "fleet.db"
    build_db.build(db, args.machines, 3)
    servers = {}
    for work in WORK:
        port = run.free_port()
        servers[work] = run.Server(
            [
                sys.executable,
                str(BENCH / "bare_server.py"),
                f"--listen=127.0.0.1:{port}",
                f"--threads={args.threads}",
                f"--db={db}",
                f"--work={work}",
            ],
            port,
            workdir / f"{work}.log",
        )
    reporters = [i for i in range(args.machines) if build_db.reporting(i)]
    rps: dict[str, list[float]] = {w: [] for w in WORK}
    cpu: dict[str, list[float]] = {w: [] for w in WORK}
    offset = 0
    try:
        for r in range(args.runs):
            for work, server in servers.items():
                load.run(server.port, reporters, duration=1.0, offset=offset)
                cpu0 = server.cpu_seconds()
                res = load.run(server.port, reporters, duration=args.duration, offset=offset)
                offset += res.requests
                rps[work].append(res.rps)
                cpu[work].append((server.cpu_seconds() - cpu0) / max(res.requests, 1) * 1e6)
                print(
                    f"  run {r} {work:6s} {res.rps:6.0f} req/s  errors {res.errors}  "
                    f"server {cpu[work][-1]:.0f} us/req",
                    file=sys.stderr,
                )
    finally:
        for server in servers.values():
            server.stop()
    print("| yardstick work per request | req/s | of the bare yardstick | server CPU |")
    print("|---|---:|---:|---:|")
    for work in WORK:
        ratio = statistics.median(a / b for a, b in zip(rps[work], rps["none"], strict=True))
        print(
            f"| {work} | {statistics.median(rps[work]):.0f} | {ratio * 100:.0f} % | "
            f"{statistics.median(cpu[work]):.0f} µs |"
        )


if __name__ == "__main__":
    main()
