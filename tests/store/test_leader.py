"""One leader among replicas: the advisory lock, the fencing epoch, kill -9 (real PostgreSQL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from conftest import wait_until
from postgres_cluster import import_psycopg

from nixfleet.errors import NotLeaderError

import_psycopg()  # skip (a .venv without the extra) or fail (CI) before the imports below
import psycopg  # noqa: E402

from nixfleet.store import audit  # noqa: E402
from nixfleet.store.leader import Leadership, check_epoch  # noqa: E402
from nixfleet.store.pg import PgStore  # noqa: E402

T0 = datetime(2026, 12, 2, 12, 0, 0, tzinfo=UTC)


@pytest.fixture
def pg_store(postgres_url: str) -> Iterator[PgStore]:
    store = PgStore(postgres_url, max_size=4)
    yield store
    store.close()


def test_one_leader_at_a_time_and_each_takeover_a_new_epoch(
    postgres_url: str, pg_store: PgStore
) -> None:
    a, b = Leadership(postgres_url, "a"), Leadership(postgres_url, "b")
    try:
        assert a.try_acquire() == 1
        assert a.try_acquire() == 1  # holding it already: the same epoch
        assert b.try_acquire() is None
        assert a.held() and not b.held()
        a.release()
        assert not a.held()
        assert b.try_acquire() == 2
        assert a.try_acquire() is None
        with pg_store.read() as conn:
            row = conn.execute("SELECT epoch, holder FROM leadership").fetchone()
        assert (row["epoch"], row["holder"]) == (2, "b")
    finally:
        a.release()
        b.release()


def test_a_fenced_leader_writes_nothing(postgres_url: str, pg_store: PgStore) -> None:
    a, b = Leadership(postgres_url, "a"), Leadership(postgres_url, "b")
    try:
        epoch_a = a.try_acquire()
        with pg_store.transaction() as conn:
            check_epoch(conn, epoch_a)
            audit.record(conn, "reconciler", "tick", "by-a", T0)
        # A's session dies (as on a network partition); B takes over.
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'nixfleet-leader a'"
            )
        assert wait_until("b to lead", b.try_acquire) == 2
        # A has not noticed yet: its next background transaction is refused whole.
        with pytest.raises(NotLeaderError, match="not the leader"), pg_store.transaction() as conn:
            check_epoch(conn, epoch_a)
            audit.record(conn, "reconciler", "tick", "by-a-too-late", T0)
        assert not a.held()
        with pytest.raises(NotLeaderError), pg_store.transaction() as conn:
            check_epoch(conn, None)  # a replica that never led
        with pg_store.read() as conn:
            assert [e.target for e in audit.query(conn)] == ["by-a"]
    finally:
        a.release()
        b.release()


def test_a_takeover_waits_for_the_old_leaders_transaction_in_flight(
    postgres_url: str, pg_store: PgStore
) -> None:
    a, b = Leadership(postgres_url, "a"), Leadership(postgres_url, "b")
    got: list[int | None] = []
    try:
        epoch_a = a.try_acquire()
        with pg_store.transaction() as conn:
            check_epoch(conn, epoch_a)
            a.release()  # the lock is free, but a tick of A is still in flight
            taker = threading.Thread(target=lambda: got.append(b.try_acquire()))
            taker.start()
            taker.join(timeout=1.0)
            assert taker.is_alive(), "the new epoch must wait for the tick in flight"
            audit.record(conn, "reconciler", "tick", "by-a", T0)
        taker.join(timeout=30)
        assert got == [2]
        with pg_store.read() as conn:
            assert [e.target for e in audit.query(conn)] == ["by-a"]
    finally:
        a.release()
        b.release()


LEADER = """
import sys, time
from nixfleet.store.leader import Leadership
lead = Leadership(sys.argv[1], "killed")
assert lead.try_acquire() is not None
print("leading", flush=True)
time.sleep(600)
"""


def test_kill_9_of_the_leader_hands_over_within_10_s(postgres_url: str, pg_store: PgStore) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", LEADER, postgres_url], stdout=subprocess.PIPE, text=True
    )
    follower = Leadership(postgres_url, "follower")
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "leading"
        assert follower.try_acquire() is None
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        killed_at = time.monotonic()
        epoch = wait_until("the follower to lead", follower.try_acquire, timeout=10, interval=0.2)
        assert epoch == 2
        assert time.monotonic() - killed_at < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        follower.release()
