"""The PostgreSQL test harness (tests/postgres_cluster.py) does what it promises."""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import wait_until
from postgres_cluster import (
    UNPRIVILEGED,
    Cluster,
    Server,
    bin_dir,
    import_psycopg,
    unavailable,
)

import_psycopg()  # skip (a .venv without the extra) or fail (CI) before the import below
import psycopg  # noqa: E402


def test_a_test_database_takes_sql(postgres_url: str) -> None:
    with psycopg.connect(postgres_url) as conn:
        conn.execute("CREATE TABLE t (id bigint PRIMARY KEY, v text NOT NULL)")
        conn.execute("INSERT INTO t VALUES (%s, %s)", (1, "one"))
        row = conn.execute("SELECT v FROM t WHERE id = %s", (1,)).fetchone()
        assert row == ("one",)
        version = conn.execute("SHOW server_version_num").fetchone()
        assert version is not None and int(version[0]) >= 150000


def test_each_test_database_is_its_own(postgres_server: Server) -> None:
    """Tables, advisory locks and notifications stay inside one database."""
    a, b = postgres_server.create_database(), postgres_server.create_database()
    try:
        assert a != b
        with psycopg.connect(a, autocommit=True) as ca, psycopg.connect(b, autocommit=True) as cb:
            ca.execute("CREATE TABLE only_in_a (x int)")
            missing = cb.execute("SELECT to_regclass('only_in_a')").fetchone()
            assert missing == (None,)
            # The same advisory lock key is free in another database.
            assert ca.execute("SELECT pg_try_advisory_lock(20)").fetchone() == (True,)
            assert cb.execute("SELECT pg_try_advisory_lock(20)").fetchone() == (True,)
            # A notification reaches listeners of its own database only.
            with (
                psycopg.connect(a, autocommit=True) as la,
                psycopg.connect(b, autocommit=True) as lb,
            ):
                la.execute("LISTEN nixfleet_test")
                lb.execute("LISTEN nixfleet_test")
                ca.execute("NOTIFY nixfleet_test, 'hello'")
                got_a = [n.payload for n in la.notifies(timeout=5, stop_after=1)]
                got_b = [n.payload for n in lb.notifies(timeout=0.5, stop_after=1)]
            assert got_a == ["hello"]
            assert got_b == []
    finally:
        postgres_server.drop_database(a)
        postgres_server.drop_database(b)
    with psycopg.connect(postgres_server.url) as conn:
        left = conn.execute(
            "SELECT count(*) FROM pg_database WHERE datname = ANY(%s)",
            ([a.rsplit("/", 1)[1], b.rsplit("/", 1)[1]],),
        ).fetchone()
    assert left == (0,)


def test_a_cluster_of_our_own_runs_unprivileged_and_leaves_nothing() -> None:
    found = bin_dir()
    if found is None:
        unavailable("no PostgreSQL binaries (Debian: apt-get install postgresql)")
    assert found is not None
    cluster = Cluster(found)
    try:
        server = cluster.start()
        with psycopg.connect(server.url) as conn:
            pid_row = conn.execute("SELECT pg_backend_pid()").fetchone()
            assert pid_row is not None
            owner = os.stat(f"/proc/{pid_row[0]}").st_uid
            listen = conn.execute("SHOW listen_addresses").fetchone()
        assert listen == ("127.0.0.1",)
        if os.geteuid() == 0:
            assert owner == pwd.getpwnam(UNPRIVILEGED).pw_uid
        else:
            assert owner == os.geteuid()
        # Two clients at once (the replicas' case), each in its own session.
        results: list[object] = []

        def query() -> None:
            with psycopg.connect(server.url) as c:
                results.append(c.execute("SELECT 1").fetchone())

        threads = [threading.Thread(target=query) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert results == [(1,), (1,)]
    finally:
        cluster.stop()
    assert not cluster.root.exists()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(cluster.server.url, connect_timeout=2)


def test_no_server_skips_for_a_developer_and_fails_under_ci(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NIXFLEET_CI", "1")
    with pytest.raises(pytest.fail.Exception, match="under CI"):
        unavailable("no PostgreSQL server")
    monkeypatch.delenv("NIXFLEET_CI")
    with pytest.raises(pytest.skip.Exception, match="no PostgreSQL server"):
        unavailable("no PostgreSQL server")


KILLED_OWNER = """
import sys
sys.path.insert(0, sys.argv[1])
from postgres_cluster import Cluster, bin_dir
cluster = Cluster(bin_dir())
cluster.start()
pid = (cluster.data / "postmaster.pid").read_text().split()[0]
print(cluster.root, pid, flush=True)
sys.stdin.read()
"""


def test_a_killed_test_process_leaves_no_server_behind() -> None:
    """SIGKILL of the process that started a cluster stops the server and removes it."""
    if bin_dir() is None:
        unavailable("no PostgreSQL binaries (Debian: apt-get install postgresql)")
    owner = subprocess.Popen(
        [sys.executable, "-c", KILLED_OWNER, str(Path(__file__).resolve().parent.parent)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout is not None
        root, pid = owner.stdout.readline().split()
        assert Path(root).is_dir()
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(timeout=30)

        def gone() -> bool:
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                return not Path(root).exists()
            return False

        wait_until("the orphaned server to stop and its directory to go", gone, timeout=30)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait(timeout=30)
