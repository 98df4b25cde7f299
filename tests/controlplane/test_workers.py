"""The control plane with worker processes (`--workers 2`): real processes, real sockets."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ControlPlane

GEN = "/nix/store/" + "w" * 32 + "-nixos-system-x"
MACHINES = [f"node-{i:02d}" for i in range(24)]


@pytest.fixture
def workers_cp(control_plane: ControlPlane) -> Iterator[ControlPlane]:
    control_plane.stop()
    control_plane.extra_args = ["--workers", "2"]
    control_plane.start()
    yield control_plane
    control_plane.stop()


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def alive(pid: int) -> bool:
    """Running, i.e. neither gone nor a zombie waiting for a parent that never reaps."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(condition: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def established_by_process(port: int, pids: list[int]) -> dict[int, int]:
    """How many established connections to `port` each process holds (from /proc)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "01":  # ESTABLISHED
                inodes.add(fields[9])
    out = {}
    for pid in pids:
        owned = 0
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                owned += 1
        out[pid] = owned
    return out


def test_workers_share_the_socket_and_every_report_lands(workers_cp: ControlPlane) -> None:
    assert workers_cp.proc is not None
    primary = workers_cp.proc.pid
    (worker,) = children(primary)
    tokens = {m: workers_cp.register(m) for m in MACHINES}
    # One keep-alive connection per machine, all open at once: both processes accept.
    conns = {
        m: http.client.HTTPConnection("127.0.0.1", workers_cp.port, timeout=30) for m in tokens
    }
    errors: list[str] = []

    def poll(machine: str) -> None:
        conn = conns[machine]
        for i in range(10):
            # a store path per poll: every report is a switch, one history event
            gen = GEN.replace("w" * 3, f"{i:03d}", 1)
            body = json.dumps({"current_generation": gen, "message": f"poll {i}"})
            conn.request(
                "POST",
                f"/api/v1/machines/{machine}/report",
                body,
                {"Authorization": f"Bearer {tokens[machine]}", "Content-Type": "application/json"},
            )
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                errors.append(f"{machine}: {resp.status}")

    threads = [threading.Thread(target=poll, args=(m,)) for m in tokens]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    owned = established_by_process(workers_cp.port, [primary, worker])
    for conn in conns.values():
        conn.close()
    assert errors == []
    assert sum(owned.values()) == len(MACHINES)
    assert all(n > 0 for n in owned.values()), owned
    db = sqlite3.connect(workers_cp.db)
    rows = dict(
        db.execute(
            "SELECT machine_id, COUNT(*) FROM machine_history WHERE kind = 'generation' "
            "GROUP BY machine_id"
        )
    )
    last = dict(db.execute("SELECT id, last_message FROM machines"))
    db.close()
    assert rows == {m: 10 for m in MACHINES}
    assert set(last.values()) == {"poll 9"}
    # SIGTERM to the primary stops the worker too, cleanly.
    workers_cp.stop()
    assert wait_until(lambda: not alive(worker))
    assert "stopped because" not in workers_cp.log.read_text()


def test_a_worker_that_dies_stops_the_service_with_an_error(workers_cp: ControlPlane) -> None:
    assert workers_cp.proc is not None
    proc = workers_cp.proc
    (worker,) = children(proc.pid)
    os.kill(worker, signal.SIGKILL)
    assert proc.wait(timeout=30) == 1
    workers_cp.proc = None
    log = workers_cp.log.read_text()
    assert f"worker {worker} was killed by signal 9" in log
    with socket.socket() as s:  # nothing holds the port any more
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", workers_cp.port))


def test_workers_stop_when_the_primary_is_killed(workers_cp: ControlPlane) -> None:
    assert workers_cp.proc is not None
    (worker,) = children(workers_cp.proc.pid)
    workers_cp.stop(kill=True)
    assert wait_until(lambda: not alive(worker))
    assert "primary process" in workers_cp.log.read_text()
    workers_cp.start()  # the port is free again, and the database is intact
    assert workers_cp.proc is not None
    assert len(children(workers_cp.proc.pid)) == 1
