"""kill -9 while agents report and operators write (issue 17, DESIGN §8): run by hand.

    python bench/heartbeat_durability.py --kills 25 --workers 1
    python bench/heartbeat_durability.py --kills 25 --workers 2

Agents (threads, one keep-alive connection each) report for their machines: mostly
heartbeats (the state the control plane already has), sometimes a change (a new
generation and message; the agent sends the next change only after this one was
acknowledged, and repeats it until it is). Operators set desired generations.
At random moments every process of the control plane gets SIGKILL at once (as
systemd's final kill of the unit's cgroup); while it is down the database is
checked, then it is restarted:

- `PRAGMA integrity_check` is ok;
- no acknowledged change is lost: each machine's current generation and message
  are its last acknowledged change's, or the one sent after it (whose answer the
  kill may have eaten); each desired generation likewise;
- last-seen is at most 1 s behind: for every machine, the newest report acknowledged
  at least 1 s before the kill is covered by its last_report_at.

tests/controlplane/test_heartbeat_durability.py runs a CI-sized version.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.util
import json
import os
import random
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))


def _hostile() -> ModuleType:
    """bench/hostile.py by path: under pytest the name `hostile` is tests/hostile/."""
    name = "nixfleet_bench_hostile"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCH / "hostile.py")
        assert spec is not None and spec.loader is not None
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


Plane = _hostile().Plane

from nixfleet.client import encode  # noqa: E402
from nixfleet.models import Lifecycle, utcnow  # noqa: E402
from nixfleet.store import Store, credentials, machines  # noqa: E402

LAST_SEEN_BOUND = 1.0  # seconds (DESIGN §8)


def generation(machine: int, n: int) -> str:
    return f"/nix/store/{machine:08d}{n:024d}-nixos-system-m{machine}"


@dataclass
class Agent:
    """What one machine's agent has had acknowledged, and what it sent since."""

    machine: str
    token: str
    acked: tuple[str, str] | None  # (generation, message) of the last acknowledged change
    pending: tuple[str, str] | None  # sent after it, not yet acknowledged
    changes: int = 0
    seen: list[tuple[float, float]] = field(default_factory=list)  # (sent, acknowledged)


@dataclass
class Result:
    workers: int
    kills: int
    reports_acknowledged: int
    heartbeats_acknowledged: int
    changes_acknowledged: int
    desired_acknowledged: int
    lost_changes: int
    lost_desired: int
    integrity_failures: int
    last_seen_late: int  # machines missing a report acknowledged >= the bound before a kill
    last_seen_lost_max_s: float  # the most acknowledged last-seen time one kill lost
    problems: list[str]


def _post(conn: http.client.HTTPConnection, path: str, body: object, token: str) -> int:
    conn.request(
        "POST" if "report" in path else "PUT",
        path,
        encode(body),  # as the agent sends it
        {"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    resp.read()
    return resp.status


def _kill_all(plane: Plane) -> None:
    """SIGKILL to the primary and its workers at once."""
    assert plane.proc is not None
    pid = plane.proc.pid
    try:
        kids = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        kids = []
    for p in [pid, *kids]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    plane.proc.wait(timeout=30)
    plane.proc = None
    for p in kids:  # re-parented to init; wait until they are gone
        while Path(f"/proc/{p}").exists():
            try:
                if Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            except OSError:
                break
            time.sleep(0.01)


def _epoch(stored: str | None) -> float:
    if stored is None:
        return 0.0
    return datetime.fromisoformat(stored.replace("Z", "+00:00")).timestamp()


def run(
    workdir: Path,
    kills: int = 25,
    workers: int = 1,
    machines_n: int = 40,
    agent_threads: int = 4,
    seed: int = 17,
) -> Result:
    rng = random.Random(seed)
    db = workdir / "nixfleet.db"
    store = Store(db)
    now = utcnow()
    agents: list[Agent] = []
    with store.transaction() as conn:
        key = credentials.create_key(conn, "bench", "admin", "bench", now)
        for i in range(machines_n):
            mid = f"m{i:03d}"
            machines.register(conn, mid, [], Lifecycle.ACTIVE, now)
            token = credentials.issue_token(conn, mid, now)
            agents.append(Agent(mid, token, None, (generation(i, 0), "0")))
    store.close()
    plane = Plane(db, workdir / "cp.log", ["--workers", str(workers)])
    plane.start()
    lock = threading.Lock()
    stop = threading.Event()
    counts = {"heartbeats": 0, "changes": 0, "desired": 0}
    desired: dict[str, tuple[str | None, str | None]] = {}  # machine: (acked, pending)

    def agent_loop(mine: list[Agent], r: random.Random) -> None:
        conn: http.client.HTTPConnection | None = None
        while not stop.is_set():
            a = r.choice(mine)
            with lock:
                if a.pending is None and r.random() < 0.1:
                    a.changes += 1
                    a.pending = (generation(int(a.machine[1:]), a.changes), str(a.changes))
                gen, msg = a.pending or a.acked  # type: ignore[misc]
            body = {"current_generation": gen, "message": msg, "uptime_seconds": 1}
            sent = time.time()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", plane.port, timeout=5)
                status = _post(conn, f"/api/v1/machines/{a.machine}/report", body, a.token)
            except (OSError, http.client.HTTPException):
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.02)
                continue
            if status != 200:
                continue
            with lock:
                a.seen.append((sent, time.time()))
                if a.pending is not None and a.pending == (gen, msg):
                    a.acked, a.pending = a.pending, None
                    counts["changes"] += 1
                else:
                    counts["heartbeats"] += 1

    def operator_loop(r: random.Random) -> None:
        conn: http.client.HTTPConnection | None = None
        n = 0
        while not stop.is_set():
            a = r.choice(agents)
            with lock:
                acked, pending = desired.get(a.machine, (None, None))
                if pending is None:
                    n += 1
                    pending = generation(900 + int(a.machine[1:]), n)
                    desired[a.machine] = (acked, pending)
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", plane.port, timeout=5)
                status = _post(
                    conn,
                    f"/api/v1/machines/{a.machine}/desired-generation",
                    {"store_path": pending},
                    key,
                )
            except (OSError, http.client.HTTPException):
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.02)
                continue
            if status == 200:
                with lock:
                    desired[a.machine] = (pending, None)
                    counts["desired"] += 1
            time.sleep(0.01)

    threads = [
        threading.Thread(
            target=agent_loop,
            args=(agents[t::agent_threads], random.Random(seed + t)),
            daemon=True,
        )
        for t in range(agent_threads)
    ]
    threads.append(threading.Thread(target=operator_loop, args=(rng,), daemon=True))
    for t in threads:
        t.start()
    problems: list[str] = []
    lost_changes = lost_desired = integrity = late = 0
    worst = 0.0
    try:
        for _ in range(kills):
            time.sleep(rng.uniform(0.3, 1.5))
            # Snapshot and kill under the lock: no agent picks a new change in between
            # (it would be sent, committed and then look lost, when only unrecorded).
            with lock:
                killed_at = time.time()
                snapshot = [(a.machine, a.acked, a.pending, list(a.seen)) for a in agents]
                wanted = dict(desired)
                _kill_all(plane)
            check = sqlite3.connect(db)
            if check.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
                integrity += 1
                problems.append("integrity_check failed")
            rows = {
                r[0]: r[1:]
                for r in check.execute(
                    "SELECT id, current_generation, last_message, last_report_at, "
                    "desired_generation FROM machines"
                )
            }
            check.close()
            for machine, acked, pending, seen in snapshot:
                current, message, last_report, desired_now = rows[machine]
                allowed = {acked, pending} if acked is not None else {pending, (None, None)}
                if (current, message) not in allowed:
                    lost_changes += 1
                    problems.append(f"{machine}: has {current} {message}, acked {acked}")
                stored = _epoch(last_report)  # the CP's receive time: after the agent's send
                if seen:
                    worst = max(worst, max(s for s, _ in seen) - stored)
                old = [s for s, ack in seen if ack <= killed_at - LAST_SEEN_BOUND]
                if old and max(old) > stored:
                    late += 1
                    problems.append(f"{machine}: last-seen {max(old) - stored:.3f} s behind")
                acked_d, pending_d = wanted.get(machine, (None, None))
                if acked_d is not None and desired_now not in (acked_d, pending_d):
                    lost_desired += 1
                    problems.append(f"{machine}: desired {desired_now}, acked {acked_d}")
            with lock:  # what the kill ate is sent again; those in flight may have landed
                for a in agents:
                    a.seen = [s for s in a.seen if s[1] > killed_at - 2 * LAST_SEEN_BOUND]
            plane.start()
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        if plane.proc is not None:
            plane.stop()
    return Result(
        workers=workers,
        kills=kills,
        reports_acknowledged=counts["heartbeats"] + counts["changes"],
        heartbeats_acknowledged=counts["heartbeats"],
        changes_acknowledged=counts["changes"],
        desired_acknowledged=counts["desired"],
        lost_changes=lost_changes,
        lost_desired=lost_desired,
        integrity_failures=integrity,
        last_seen_late=late,
        last_seen_lost_max_s=round(max(worst, 0.0), 3),
        problems=problems[:20],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=25)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--machines", type=int, default=40)
    parser.add_argument("--agents", type=int, default=4, help="agent threads")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(Path(tmp), args.kills, args.workers, args.machines, args.agents)
    print(json.dumps(asdict(result), indent=2))


if __name__ == "__main__":
    main()
