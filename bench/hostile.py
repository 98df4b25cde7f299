"""Hostile-world harnesses (DESIGN §9), run by hand: python bench/hostile.py [options].

  durability   writers register machines against the real control plane while it is
               killed with SIGKILL at random moments and restarted; afterwards every
               acknowledged write (a 201 received) must be in the database.
  sockets      holds N idle and M half-sent sockets on the control plane and counts
               how many agent reports (fresh connection each) still succeed.
  burst        opens N new connections at once, then times one agent report on a
               fresh connection behind them (waitress accepts one connection per
               loop turn, so the first request behind a burst waits for the rest).

CI runs small versions of both (tests/hostile/test_durability.py, test_limits.py);
this script runs the full-size ones and prints the figures as JSON:

    python bench/hostile.py durability --kills 50 --writers 4
    python bench/hostile.py sockets --idle 5000 --slow 500 --reports 100
    python bench/hostile.py burst --sizes 0,1000,3000,6000
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nixfleet.models import utcnow  # noqa: E402
from nixfleet.store import Store, credentials, machines  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Plane:
    """One control-plane process on 127.0.0.1 over a given database."""

    def __init__(self, db: Path, log: Path, extra: list[str] | None = None) -> None:
        self.db, self.log, self.extra = db, log, extra or []
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        cmd = [sys.executable, "-m", "nixfleet.controlplane.main", "--db", str(self.db)]
        cmd += ["--listen", f"127.0.0.1:{self.port}", *self.extra]
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"control plane exited {self.proc.returncode}")
            try:
                if _request(self.port, "GET", "/health", timeout=1)[0] == 200:
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("control plane did not start")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=30)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self.proc = None


def _request(
    port: int, method: str, path: str, body: Any = None, token: str = "", timeout: float = 10
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, json.dumps(body) if body is not None else None, headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _admin_db(db: Path) -> str:
    store = Store(db)
    with store.transaction() as conn:
        key = credentials.create_key(conn, "bench", "admin", "bench", utcnow())
    store.close()
    return key


@dataclass
class Durability:
    kills: int
    acknowledged: int
    lost: int
    refused_5xx: int
    lost_ids: list[str]


def durability(workdir: Path, kills: int = 50, writers: int = 4, seed: int = 14) -> Durability:
    """Kill -9 the CP `kills` times under write load; count acknowledged writes lost."""
    rng = random.Random(seed)
    db = workdir / "nixfleet.db"
    key = _admin_db(db)
    plane = Plane(db, workdir / "cp.log")
    plane.start()
    acknowledged: list[str] = []
    server_errors = [0]
    stop = threading.Event()
    lock = threading.Lock()

    def write(w: int) -> None:
        n = 0
        while not stop.is_set():
            machine_id = f"w{w}-{n}"
            try:
                status, _ = _request(
                    plane.port, "POST", "/api/v1/machines", {"id": machine_id}, key, timeout=5
                )
            except (OSError, http.client.HTTPException):
                time.sleep(0.02)  # down (being killed or restarting): try the same id again
                continue
            if status == 201:
                with lock:
                    acknowledged.append(machine_id)
                n += 1
            elif status == 409:
                n += 1  # committed before the kill, its answer lost: not acknowledged
            elif status >= 500:
                server_errors[0] += 1

    threads = [threading.Thread(target=write, args=(w,), daemon=True) for w in range(writers)]
    for t in threads:
        t.start()
    try:
        for _ in range(kills):
            time.sleep(rng.uniform(0.1, 0.6))
            plane.kill()
            plane.start()
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        plane.stop()
    store = Store(db)
    with store.read() as conn:
        present = set(machines.machine_ids(conn, []))
    store.close()
    lost = sorted(set(acknowledged) - present)
    return Durability(kills, len(acknowledged), len(lost), server_errors[0], lost[:20])


@dataclass
class Sockets:
    idle: int
    slow: int
    reports: int
    succeeded: int


def sockets(workdir: Path, idle: int = 5000, slow: int = 500, reports: int = 100) -> Sockets:
    """Hold idle and half-sent sockets; count agent reports that still succeed."""
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, idle + slow + 1024), hard))
    db = workdir / "nixfleet.db"
    key = _admin_db(db)
    plane = Plane(db, workdir / "cp.log")
    plane.start()
    held: list[socket.socket] = []
    try:
        status, body = _request(
            plane.port, "POST", "/api/v1/machines", {"id": "web-01", "issue_token": True}, key
        )
        token = json.loads(body)["token"]
        for _ in range(idle):
            held.append(socket.create_connection(("127.0.0.1", plane.port), timeout=10))
        for _ in range(slow):
            s = socket.create_connection(("127.0.0.1", plane.port), timeout=10)
            s.sendall(b"POST /api/v1/machines/web-01/report HTTP/1.1\r\nHost: x\r\nContent-Le")
            held.append(s)
        report = {"current_generation": "/nix/store/" + "a" * 32 + "-nixos-system-web-01"}
        ok = 0
        for _ in range(reports):
            try:
                status, _ = _request(
                    plane.port, "POST", "/api/v1/machines/web-01/report", report, token
                )
                ok += status == 200
            except (OSError, http.client.HTTPException):
                pass
        return Sockets(idle, slow, reports, ok)
    finally:
        for s in held:
            s.close()
        plane.stop()


@dataclass
class Burst:
    connections: int
    open_s: float  # opening the burst's sockets (the kernel completes them)
    report_s: float  # the agent report right behind it, connect to answer


def burst(workdir: Path, sizes: list[int]) -> list[Burst]:
    """Per size: open that many connections as fast as possible, then time a report."""
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(sizes) + 1024), hard))
    db = workdir / "nixfleet.db"
    key = _admin_db(db)
    plane = Plane(db, workdir / "cp.log")
    plane.start()
    report = {"current_generation": "/nix/store/" + "a" * 32 + "-nixos-system-web-01"}
    results: list[Burst] = []
    try:
        _status, body = _request(
            plane.port, "POST", "/api/v1/machines", {"id": "web-01", "issue_token": True}, key
        )
        token = json.loads(body)["token"]
        for size in sizes:
            held: list[socket.socket] = []
            try:
                started = time.monotonic()
                for _ in range(size):
                    held.append(socket.create_connection(("127.0.0.1", plane.port), timeout=30))
                opened = time.monotonic()
                status, _ = _request(
                    plane.port, "POST", "/api/v1/machines/web-01/report", report, token, 60
                )
                assert status == 200, status
                results.append(Burst(size, opened - started, time.monotonic() - opened))
            finally:
                for s in held:
                    s.close()
            time.sleep(2)  # let the closed burst drain before the next size
    finally:
        plane.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    d = sub.add_parser("durability")
    d.add_argument("--kills", type=int, default=50)
    d.add_argument("--writers", type=int, default=4)
    s = sub.add_parser("sockets")
    s.add_argument("--idle", type=int, default=5000)
    s.add_argument("--slow", type=int, default=500)
    s.add_argument("--reports", type=int, default=100)
    b = sub.add_parser("burst")
    b.add_argument("--sizes", default="0,1000,3000,6000")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result: Any
        if args.what == "durability":
            result = durability(Path(tmp), args.kills, args.writers)
        elif args.what == "burst":
            sizes = [int(n) for n in args.sizes.split(",")]
            print(json.dumps([asdict(r) for r in burst(Path(tmp), sizes)], indent=2))
            return
        else:
            result = sockets(Path(tmp), args.idle, args.slow, args.reports)
    print(json.dumps(asdict(result), indent=2))


if __name__ == "__main__":
    main()
