"""The agent's idle cost: RSS and CPU per poll, against the real control plane.

    python bench/agent_bench.py [--polls 40] [--interval 0.5] [--runs 3]

Builds a fake system closure with real Nix (the agent's current generation),
starts the real control plane and one real `nixfleet-agent` polling it, and reads
the agent's /proc counters: VmRSS after the polls, and user+system CPU time
(children included: health-check commands count) divided by the polls the control
plane actually received. Needs Nix (Debian's nix-bin is enough). Run by hand; CI
never runs benchmarks.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAKE_SYSTEM = ROOT / "tests" / "nix" / "fake-system.nix"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """utime + stime + cutime + cstime of a live process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / CLK_TCK


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def one_run(work: Path, polls: int, interval: float, health: bool) -> dict[str, float]:
    env = dict(os.environ)
    env.setdefault("NIX_CONFIG", "substituters =\nexperimental-features = nix-command flakes")
    system = subprocess.run(
        ["nix-build", FAKE_SYSTEM, "--argstr", "salt", f"bench-{time.time_ns()}", "--no-out-link"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout.strip()
    db = work / "cp.db"
    cp = [sys.executable, "-m", "nixfleet.controlplane.main", "--db", str(db)]
    key = subprocess.run(
        [*cp, "keys", "create", "--name", "bench"], capture_output=True, text=True, check=True
    ).stdout.strip()
    port = free_port()
    server = subprocess.Popen([*cp, "--listen", f"127.0.0.1:{port}"], stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(url + "/health", timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        req = urllib.request.Request(
            url + "/api/v1/machines",
            data=json.dumps({"id": "bench-01", "issue_token": True}).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        )
        token = json.load(urllib.request.urlopen(req))["token"]
        (work / "token").write_text(token)
        (work / "token").chmod(0o600)
        link = work / "current-system"
        link.symlink_to(system)
        checks = (
            {"command": [{"name": "true", "argv": ["/bin/true"], "timeout": 5}]} if health else {}
        )
        config = {
            "control_plane_url": url,
            "machine_id": "bench-01",
            "token_file": str(work / "token"),
            "poll_interval": interval,
            "profile": str(work / "profile"),
            "current_system": str(link),
            "state_dir": str(work / "state"),
            "use_systemd_run": False,
            "health_checks": checks,
        }
        (work / "agent.json").write_text(json.dumps(config))
        agent = subprocess.Popen(
            [sys.executable, "-m", "nixfleet.agent.main", "--config", str(work / "agent.json")],
            stderr=subprocess.DEVNULL,
            env=env,
        )
        time.sleep(2)  # start-up: imports, first cycle
        conn = sqlite3.connect(db)
        seen: set[str] = set()

        def count() -> int:
            # A report is a new last_report_at (history keeps changes, not polls);
            # sampled at a quarter of the interval, no poll goes unseen.
            row = conn.execute("SELECT last_report_at FROM machines").fetchone()
            if row and row[0]:
                seen.add(row[0])
            return len(seen)

        first_polls, first_cpu = count(), cpu_seconds(agent.pid)
        while count() < first_polls + polls:
            time.sleep(interval / 4)
        done_polls, done_cpu, rss = count(), cpu_seconds(agent.pid), rss_mib(agent.pid)
        agent.terminate()
        agent.wait(timeout=30)
        return {
            "rss_mib": rss,
            "cpu_ms_per_poll": 1000 * (done_cpu - first_cpu) / (done_polls - first_polls),
        }
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--polls", type=int, default=40)
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    for label, health in (("no health checks", False), ("one command health check", True)):
        runs = []
        for _ in range(args.runs):
            with tempfile.TemporaryDirectory(prefix="nixfleet-agent-bench-") as tmp:
                runs.append(one_run(Path(tmp), args.polls, args.interval, health))
        results[label] = {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]}
        print(
            f"{label:26}  RSS {results[label]['rss_mib']:.1f} MiB  "
            f"CPU {results[label]['cpu_ms_per_poll']:.2f} ms/poll  (median of {args.runs})"
        )
    out = ROOT / "bench" / "results" / "agent.json"
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
