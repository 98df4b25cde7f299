"""Releases on both backends (`any_store`): written once, listed newest first with their
counts, deleted only while no rollout records them, pruned ones 410 until registered
again. On PostgreSQL, two transactions registering one release at once write it once.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from nixfleet.errors import ConflictError, GoneError, NotFoundError
from nixfleet.flake import release_from_document
from nixfleet.models import Release, ReleaseEntry, isoformat
from nixfleet.store import releases
from nixfleet.store.conn import AnyStore, Connection

T0 = datetime(2026, 9, 1, 10, 0, tzinfo=UTC)


def make(salt: str, hosts: tuple[str, ...] = ("web-02", "web-01", "db-01")) -> Release:
    entries = [
        {
            "hostname": h,
            "store_path": f"/nix/store/{salt * 32}-nixos-system-{h}",
            "platform": "x86_64-linux",
            "tags": ["web"] if h.startswith("web") else [],
        }
        for h in hosts
    ]
    return release_from_document({"cache_url": "https://cache.example.com", "entries": entries})


def record_rollout(conn: Connection, release_id: str, name: str, at: datetime) -> None:
    """A rollout row naming the release (store.rollouts writes the rest; not needed here)."""
    conn.execute(
        "INSERT INTO rollouts (id, name, release_id, status, document_json, document_hash, "
        "source, created_at, created_by, updated_at) "
        "VALUES (?, ?, ?, 'completed', '{}', 'h', 'api', ?, 'test', ?)",
        (f"{name}-id", name, release_id, isoformat(at), isoformat(at)),
    )


def test_a_release_is_written_once_and_read_back(any_store: AnyStore) -> None:
    a, b = make("a"), make("b", ("web-01",))
    with any_store.transaction() as conn:
        assert releases.insert(conn, a, T0, "key:admin")
        assert not releases.insert(conn, a, T0 + timedelta(hours=1), "key:other")
        assert releases.insert(conn, b, T0 + timedelta(hours=1), "key:admin")
        record_rollout(conn, a.id, "first", T0)
    with any_store.read() as conn:
        got = releases.get(conn, a.id)
        listed = releases.list_releases(conn)
        paths = releases.store_paths(conn, a.id)
        assert releases.store_paths(conn, "rel-unknown") == {}
        with pytest.raises(NotFoundError, match="not registered"):
            releases.get(conn, "rel-unknown")
    assert got.entries == tuple(sorted(a.entries, key=lambda e: e.hostname))
    assert (got.created_at, got.created_by, got.cache_url) == (T0, "key:admin", a.cache_url)
    assert got.entry("web-01") == ReleaseEntry(
        "web-01", a.entries[1].store_path, "x86_64-linux", ("web",)
    )
    assert [(r.id, r.hosts, r.rollouts) for r in listed] == [(b.id, 1, 0), (a.id, 3, 1)]
    assert paths == {e.hostname: e.store_path for e in a.entries}


def test_a_release_a_rollout_records_is_not_deleted(any_store: AnyStore) -> None:
    a, b = make("a"), make("b")
    with any_store.transaction() as conn:
        releases.insert(conn, a, T0, "test")
        releases.insert(conn, b, T0, "test")
        record_rollout(conn, a.id, "second", T0 + timedelta(minutes=1))
        record_rollout(conn, a.id, "first", T0)
    conflict = pytest.raises(ConflictError, match="rollout\\(s\\) first, second")
    with conflict, any_store.transaction() as conn:
        releases.delete(conn, a.id)
    with any_store.transaction() as conn:
        releases.delete(conn, b.id)
        with pytest.raises(NotFoundError):
            releases.delete(conn, b.id)
    with any_store.read() as conn:
        assert [r.id for r in releases.list_releases(conn)] == [a.id]
        assert conn.execute("SELECT count(*) FROM release_entries").fetchone()[0] == 3


def test_a_pruned_release_is_gone_until_registered_again(any_store: AnyStore) -> None:
    a = make("a")
    with any_store.transaction() as conn:
        releases.insert(conn, a, T0, "key:admin")
        # what store.retention does: pruned_at, then some of the entries (in chunks)
        conn.execute("UPDATE releases SET pruned_at = ? WHERE id = ?", (isoformat(T0), a.id))
        conn.execute("DELETE FROM release_entries WHERE hostname = 'db-01'")
    with any_store.read() as conn:
        (listed,) = releases.list_releases(conn)
        assert (listed.pruned_at, listed.hosts) == (T0, 0)
        with pytest.raises(GoneError, match="register it again"):
            releases.get(conn, a.id)
        with pytest.raises(GoneError):
            releases.store_paths(conn, a.id)
    later = T0 + timedelta(days=3)
    with any_store.transaction() as conn:
        assert releases.insert(conn, a, later, "key:other")
        assert not releases.insert(conn, a, later, "key:other")
    with any_store.read() as conn:
        got = releases.get(conn, a.id)
    assert len(got.entries) == 3
    assert (got.created_at, got.created_by) == (T0, "key:admin")  # the first header


def test_one_release_registered_twice_at_once_is_written_once(any_store: AnyStore) -> None:
    """The second registration waits for the first (PostgreSQL: the primary key's
    conflict; SQLite: its one writer), then finds it: False, no error."""
    a = make("a")
    results: list[bool | BaseException] = []

    def second() -> None:
        try:
            with any_store.transaction() as conn:
                results.append(releases.insert(conn, a, T0, "second"))
        except BaseException as e:  # reported by the assertion below
            results.append(e)

    with any_store.transaction() as conn:
        assert releases.insert(conn, a, T0, "first")
        thread = threading.Thread(target=second)
        thread.start()
        thread.join(0.5)  # long enough for the second to be waiting on us
        assert thread.is_alive()
    thread.join(30)
    assert results == [False]
    with any_store.read() as conn:
        assert releases.get(conn, a.id).created_by == "first"
        assert conn.execute("SELECT count(*) FROM release_entries").fetchone()[0] == 3


def test_a_restore_and_a_registration_at_once_restore_once(any_store: AnyStore) -> None:
    """Two registrations of a pruned release at once: the first restores its entries,
    the second waits on the release's row lock (PostgreSQL) and finds it restored."""
    a = make("a")
    with any_store.transaction() as conn:
        releases.insert(conn, a, T0, "test")
        conn.execute("UPDATE releases SET pruned_at = ? WHERE id = ?", (isoformat(T0), a.id))
        conn.execute("DELETE FROM release_entries")
    results: list[bool | BaseException] = []

    def second() -> None:
        try:
            with any_store.transaction() as conn:
                results.append(releases.insert(conn, a, T0, "test"))
        except BaseException as e:  # reported by the assertion below
            results.append(e)

    with any_store.transaction() as conn:
        assert releases.insert(conn, a, T0, "test")
        thread = threading.Thread(target=second)
        thread.start()
        thread.join(0.5)
        assert thread.is_alive()
    thread.join(30)
    assert results == [False]
    with any_store.read() as conn:
        assert len(releases.get(conn, a.id).entries) == 3


def test_a_restore_holds_the_release_until_it_commits(postgres_url: str) -> None:
    """PostgreSQL: a restore that has read the release pruned holds its row, so a second
    registration in that moment waits and finds it restored (without the lock both
    would read it pruned and restore it twice)."""
    from nixfleet.store.pg import PgConnection, PgStore

    a = make("a")
    store = PgStore(postgres_url, max_size=2)
    try:
        with store.transaction() as conn:
            releases.insert(conn, a, T0, "test")
            conn.execute("UPDATE releases SET pruned_at = ? WHERE id = ?", (isoformat(T0), a.id))
            conn.execute("DELETE FROM release_entries")
        results: list[bool | BaseException] = []

        def second() -> None:
            try:
                with store.transaction() as conn:
                    results.append(releases.insert(conn, a, T0, "test"))
            except BaseException as e:  # reported by the assertion below
                results.append(e)

        thread = threading.Thread(target=second)

        class PausingAfterRead(PgConnection):
            def execute(self, sql: str, parameters: Any = (), /) -> Any:
                cursor = super().execute(sql, parameters)
                if sql.startswith("SELECT pruned_at") and not thread.is_alive():
                    thread.start()
                    thread.join(0.5)  # the second registration runs now, or waits
                return cursor

        with store.transaction() as conn:
            assert releases.insert(PausingAfterRead(conn.raw), a, T0, "test")
            assert thread.is_alive()
        thread.join(30)
        assert results == [False]
        with store.read() as conn:
            assert len(releases.get(conn, a.id).entries) == 3
    finally:
        store.close()
