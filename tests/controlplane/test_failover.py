"""Several control planes on one PostgreSQL: one leader, and a fail-over that loses nothing.

Three real `nixfleet-control-plane` processes share a throwaway PostgreSQL database
(DESIGN §13). Simulated agents report to a follower while the test kills the leader
with SIGKILL in the middle of a rollout; another replica must take the lead within
10 s, the rollout must complete without any batch started twice, and every write a
replica acknowledged must be there afterwards.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ControlPlane, new_control_plane, wait_until
from ports import free_port
from test_rollout_integration import Fleet, cli, write_release, write_rollout

from nixfleet.client import Client
from nixfleet.database_url import parse
from nixfleet.errors import NixfleetError
from nixfleet.store import open_store

REPLICAS = 3
TAKEOVER = 10.0  # seconds: DESIGN §8


def leadership(url: str) -> tuple[int, str | None]:
    store = open_store(parse(url))
    try:
        with store.read() as conn:
            row = conn.execute("SELECT epoch, holder FROM leadership WHERE id = 1").fetchone()
            assert row is not None
            return int(row["epoch"]), row["holder"]
    finally:
        store.close()


@pytest.fixture
def replicas(tmp_path: Path, postgres_url: str) -> Iterator[list[ControlPlane]]:
    first = new_control_plane(
        tmp_path / "cp0", "--reconcile-interval", "0.1", database_url=postgres_url
    )
    planes = [first]
    for i in range(1, REPLICAS):
        root = tmp_path / f"cp{i}"
        root.mkdir()
        planes.append(
            ControlPlane(
                db=root / "unused.db",
                port=free_port(),
                admin_key=first.admin_key,
                log=root / "cp.log",
                extra_args=list(first.extra_args),
                database_url=postgres_url,
            )
        )
    for p in planes:
        p.start()
    yield planes
    for p in planes:
        p.stop()


def leader_of(planes: list[ControlPlane], url: str) -> ControlPlane:
    def found() -> ControlPlane | None:
        _, holder = leadership(url)
        pid = int(holder.rsplit(":", 1)[1]) if holder else -1
        return next((p for p in planes if p.proc is not None and p.proc.pid == pid), None)

    leader = wait_until("a leader", found)
    assert leader is not None
    return leader


def test_only_the_leader_reconciles_and_a_kill_9_hands_over_within_10s(
    replicas: list[ControlPlane], postgres_url: str, tmp_path: Path
) -> None:
    leader = leader_of(replicas, postgres_url)
    epoch, _ = leadership(postgres_url)
    followers = [p for p in replicas if p is not leader]
    # Agents and the operator talk to a follower: the API is every replica's.
    serving = followers[0]
    fleet = Fleet(serving)
    fleet.poll_all()
    release = write_release(tmp_path)
    rollout = write_rollout(tmp_path, release, batches=[1, 1, 1, 1, "100%"])
    assert cli(serving, "rollout", "apply", "-f", str(rollout)).returncode == 0
    fleet.start()

    # Writes acknowledged by the leader itself while it dies: each must survive.
    acknowledged: list[str] = []
    stop = threading.Event()

    def write_to_leader() -> None:
        client = Client(leader.url, leader.admin_key)
        for i in range(10_000):
            if stop.is_set():
                return
            try:
                client.post("/api/v1/machines", {"id": f"acked-{i:04}", "tags": ["x"]})
            except (NixfleetError, OSError):
                return  # the leader is gone
            acknowledged.append(f"acked-{i:04}")

    writer = threading.Thread(target=write_to_leader, daemon=True)
    writer.start()

    def batches_done() -> int:
        data = serving.client().get("/api/v1/rollouts/web")
        return sum(b["status"] == "succeeded" for b in data["batches"])

    wait_until("two batches", lambda: batches_done() >= 2)
    leader.stop(kill=True)
    killed = time.monotonic()
    stop.set()
    writer.join(timeout=30)

    def taken_over() -> bool:
        return leadership(postgres_url)[0] > epoch

    wait_until("a new leader", taken_over, timeout=TAKEOVER)
    took = time.monotonic() - killed
    assert took < TAKEOVER
    new_leader = leader_of(followers, postgres_url)
    assert new_leader in followers

    r = cli(serving, "rollout", "status", "web", "--wait", "--interval", "0.1")
    fleet.stop()
    assert r.returncode == 0, r.stderr + r.stdout
    data = serving.client().get("/api/v1/rollouts/web")
    assert [b["status"] for b in data["batches"]] == ["succeeded"] * 5
    kinds = [e["kind"] for e in data["events"]]
    assert kinds.count("batch-started") == 5  # no batch started twice
    assert acknowledged, "the leader acknowledged no write before it died"
    ids = {m["id"] for m in serving.client().get("/api/v1/machines")["machines"]}
    assert set(acknowledged) <= ids
    print(f"took over in {took:.2f} s; {len(acknowledged)} writes acknowledged by the leader")
