"""Database faults against a real control plane (issue 14, part 3).

Before: a corrupt database gave a traceback, an empty file silently became a new
empty fleet, a replaced or deleted file went unnoticed, an outside lock holder hung
every thread (reads and /health too), and after a failed COMMIT (disk full) every
later write failed until a restart while /health said 200.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, ControlPlane
from ports import free_port

from hostile.wire import raw, send
from nixfleet.models import utcnow
from nixfleet.store import Store, credentials

GEN = "/nix/store/" + "a" * 32 + "-nixos-system-web-01"


def _start_cp(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """A control plane expected to refuse to start: it must exit by itself."""
    return subprocess.run(
        [
            *(sys.executable, "-m", "nixfleet.controlplane.main", "--db", str(db)),
            *("--listen", f"127.0.0.1:{free_port()}", *args),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )


def _fleet_db(path: Path) -> str:
    store = Store(path)
    with store.transaction() as conn:
        key = credentials.create_key(conn, "admin", "admin", "test", utcnow())
    store.close()
    return key


def test_a_file_that_is_not_a_database_is_refused_with_exit_7(tmp_path: Path) -> None:
    db = tmp_path / "nixfleet.db"
    db.write_bytes(b"this is not a database" * 1000)
    done = _start_cp(db)
    assert done.returncode == 7, done.stderr
    assert "not a usable SQLite database" in done.stderr and "Traceback" not in done.stderr


def test_a_schema_corrupted_into_bytes_that_are_not_utf8_is_refused_with_exit_7(
    tmp_path: Path,
) -> None:
    """SQLite names a malformed schema entry in its error message; when the entry's
    name is no longer UTF-8, sqlite3 raised UnicodeDecodeError (a traceback, exit 1),
    as a random corruption in the test below once showed."""
    db = tmp_path / "nixfleet.db"
    _fleet_db(db)
    with sqlite3.connect(db) as conn:
        (name,) = conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL LIMIT 1"
        ).fetchone()
    conn.close()
    assert not Path(f"{db}-wal").exists() or Path(f"{db}-wal").stat().st_size == 0
    data = db.read_bytes()
    # The entry's name column (its first occurrence, before its own CREATE INDEX),
    # not its SQL: the two now disagree, and SQLite reports the entry by that name.
    first = data.index(name.encode())
    assert data.index(f"CREATE INDEX {name} ".encode()) > first, name
    db.write_bytes(data[: first + 2] + b"\xa0" + data[first + 3 :])
    done = _start_cp(db)
    assert done.returncode == 7, done.stderr
    assert "not a usable SQLite database (it is corrupt" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_corrupt_pages_fail_quick_check_with_exit_7(tmp_path: Path) -> None:
    db = tmp_path / "nixfleet.db"
    store = Store(db)
    with store.transaction() as conn:
        for i in range(3000):
            credentials.create_key(conn, f"k{i}", "readonly", "test", utcnow())
    store.close()
    data = bytearray(db.read_bytes())
    page = 4096
    assert len(data) > 20 * page
    for n in range(3, len(data) // page, 2):  # every other page after the schema
        data[n * page + 100 : n * page + 400] = os.urandom(300)
    db.write_bytes(bytes(data))
    done = _start_cp(db)
    assert done.returncode == 7, done.stderr
    assert "corrupt" in done.stderr or "not a usable" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_an_empty_file_is_not_silently_a_new_fleet(tmp_path: Path) -> None:
    db = tmp_path / "nixfleet.db"
    db.touch()
    done = _start_cp(db)
    assert done.returncode == 7, done.stderr
    assert "is empty (0 bytes)" in done.stderr and "--init" in done.stderr
    assert db.stat().st_size == 0  # nothing was created in it
    # With --init, a new fleet starts there (the process serves, so stop it ourselves).
    cp = ControlPlane(db=db, port=free_port(), admin_key="", log=tmp_path / "cp.log")
    cp.extra_args = ["--init"]
    cp.start()
    assert raw(cp.url, "GET", "/ready").status == 200
    cp.stop()
    assert db.stat().st_size > 0
    # A missing file is still created (a first run), and an existing database just opens.
    assert _start_cp(tmp_path / "new" / "nixfleet.db", "keys", "list").returncode == 0
    assert _start_cp(db, "keys", "list").returncode == 0


@pytest.mark.parametrize("fault", ["deleted", "replaced"])
def test_a_database_replaced_or_deleted_under_the_cp_stops_writes(
    control_plane: ControlPlane, tmp_path: Path, fault: str
) -> None:
    url, key = control_plane.url, control_plane.admin_key
    assert send(url, "POST", "/api/v1/machines", {"id": "web-01"}, key).status == 201
    assert raw(url, "GET", "/ready").json()["status"] == "ready"
    db = control_plane.db
    moved = tmp_path / "moved.db"
    shutil.copy(db, moved)
    if fault == "deleted":
        db.unlink()
    else:
        other = tmp_path / "other.db"
        _fleet_db(other)
        os.replace(other, db)
    refused = send(url, "POST", "/api/v1/machines", {"id": "web-02"}, key)
    assert refused.status == 503, refused.body
    assert fault in refused.json()["detail"] and "restart" in refused.json()["detail"]
    assert refused.headers["retry-after"].isdigit()
    ready = raw(url, "GET", "/ready")
    assert ready.status == 503 and fault in ready.json()["detail"]
    assert raw(url, "GET", "/health").status == 200  # alive: it answers, it says why
    # Reads go on where a connection to the opened file exists; a thread that would
    # have to open the path anew says why instead (never a 500, never an empty fleet).
    for _ in range(20):
        got = raw(url, "GET", "/api/v1/machines/web-01", token=key)
        assert got.status in (200, 503), got.body
        if got.status == 503:
            assert fault in got.json()["detail"]


def test_an_outside_write_lock_holder_costs_writes_a_bounded_503_and_reads_nothing(
    tmp_path: Path, control_plane: ControlPlane
) -> None:
    control_plane.stop()
    config = tmp_path / "settings.json"
    config.write_text(json.dumps({"write_lock_timeout": 1}))
    control_plane.extra_args = ["--config", str(config)]
    control_plane.port = free_port()
    control_plane.start()
    url, key = control_plane.url, control_plane.admin_key
    token = control_plane.register("web-01")
    holder = sqlite3.connect(control_plane.db, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    try:
        statuses: list[int] = []

        def write(i: int) -> None:
            doc = {"id": f"w-{i}"}
            statuses.append(send(url, "POST", "/api/v1/machines", doc, key).status)

        writers = [threading.Thread(target=write, args=(i,)) for i in range(24)]
        for t in writers:
            t.start()
        # While 24 writes (three times the server's threads) want the lock, reads answer.
        for _ in range(10):
            assert raw(url, "GET", "/health", timeout=15).status == 200
            assert raw(url, "GET", "/api/v1/machines", token=key, timeout=15).status == 200
        for t in writers:
            t.join(timeout=60)
        assert statuses and set(statuses) == {503}, statuses
        refused = send(url, "POST", "/api/v1/machines", {"id": "w-x"}, key)
        assert refused.status == 503 and "write lock" in refused.json()["detail"]
        assert refused.headers["retry-after"].isdigit()
        assert raw(url, "GET", "/ready", timeout=15).status == 503
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    # The lock is free again: writes go through without a restart.
    assert send(url, "POST", "/api/v1/machines", {"id": "w-after"}, key).status == 201
    report = send(url, "POST", "/api/v1/machines/web-01/report", {"current_generation": GEN}, token)
    assert report.status == 200
    assert raw(url, "GET", "/ready").status == 200


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: a disk that fills up (root only; this suite runs as root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass  # ENOSPC: the disk is full
    finally:
        os.close(fd)
    return filler


def test_disk_full_is_a_503_and_writes_recover_without_a_restart(
    small_disk: Path, tmp_path: Path
) -> None:
    db = small_disk / "nixfleet.db"
    key = _fleet_db(db)
    cp = ControlPlane(db=db, port=free_port(), admin_key=key, log=tmp_path / "cp.log")
    cp.start()
    try:
        url = cp.url
        assert send(url, "POST", "/api/v1/machines", {"id": "before"}, key).status == 201
        filler = _fill(small_disk)
        tags = [f"tag-{i:03d}-" + "x" * 50 for i in range(64)]
        statuses = []
        for i in range(400):
            got = send(url, "POST", "/api/v1/machines", {"id": f"m-{i}", "tags": tags}, key)
            statuses.append(got.status)
            if got.status == 503:
                assert "disk" in got.json()["detail"] and "full" in got.json()["detail"]
                assert got.headers["content-type"] == "application/problem+json"
                break
        assert statuses[-1] == 503, statuses
        assert 500 not in statuses
        ready = raw(url, "GET", "/ready")
        assert ready.status == 503, ready.body
        assert "full" in ready.json()["detail"] and "bytes free" in ready.json()["detail"]
        assert raw(url, "GET", "/health").status == 200
        # Still full: still a clean 503, not "cannot start a transaction within a transaction".
        again = send(url, "POST", "/api/v1/machines", {"id": "still-full"}, key)
        assert again.status == 503, again.body
        filler.unlink()
        after = send(url, "POST", "/api/v1/machines", {"id": "after"}, key)
        assert after.status == 201, after.body
        assert raw(url, "GET", "/ready").status == 200
        got = raw(url, "GET", "/api/v1/machines/after", token=key)
        assert got.status == 200
    finally:
        cp.stop()
