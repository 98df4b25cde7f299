"""Change numbers reach every replica's listener, committed ones only, in the order of
their numbers (real PostgreSQL)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import wait_until
from postgres_cluster import import_psycopg

import_psycopg()  # skip (a .venv without the extra) or fail (CI) before the imports below
import psycopg  # noqa: E402

from nixfleet.models import Lifecycle, utcnow  # noqa: E402
from nixfleet.store import (  # noqa: E402
    machines,
    pg_notify,
    report_cache,
)
from nixfleet.store.pg import PgStore  # noqa: E402
from nixfleet.store.pg_notify import ChangeListener, notify  # noqa: E402


def last_change(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def pg_store(postgres_url: str) -> Iterator[PgStore]:
    store = PgStore(postgres_url, max_size=4)
    with store.transaction() as conn:
        conn.execute("CREATE TABLE changes (seq BIGINT PRIMARY KEY)")
    yield store
    store.close()


def change(store: PgStore, seq: int) -> None:
    with store.transaction() as conn:
        conn.execute("INSERT INTO changes (seq) VALUES (?)", (seq,))
        notify(conn, seq)


def test_every_listener_hears_committed_changes_only(postgres_url: str, pg_store: PgStore) -> None:
    change(pg_store, 1)  # before anyone listens: the seed finds it
    replicas = [ChangeListener(postgres_url, last_change).start() for _ in range(2)]
    try:
        for r in replicas:
            assert r.wait_for(1, timeout=30)
        change(pg_store, 2)
        with pytest.raises(RuntimeError), pg_store.transaction() as conn:
            conn.execute("INSERT INTO changes (seq) VALUES (3)")
            notify(conn, 3)
            raise RuntimeError("rolled back: never published")
        for r in replicas:
            assert r.wait_for(2, timeout=30)
            assert not r.wait_for(3, timeout=0.5)  # a notification takes milliseconds
            assert r.published() == 2
        change(pg_store, 4)
        for r in replicas:
            assert r.wait_for(4, timeout=30)
            assert r.published() == 4
    finally:
        for r in replicas:
            r.stop()
    assert all(r.published() is None for r in replicas)


def test_a_lost_listener_knows_nothing_until_it_is_back(
    postgres_url: str, pg_store: PgStore
) -> None:
    listener = ChangeListener(postgres_url, last_change).start()
    try:
        assert listener.wait_for(0, timeout=30)
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'nixfleet-listen'"
            )
            wait_until("the listener to notice", lambda: listener.published() is None)
            # Committed while it was away: the seed after reconnecting finds it.
            change(pg_store, 7)
        assert listener.wait_for(7, timeout=30)
        change(pg_store, 8)
        assert listener.wait_for(8, timeout=30)
    finally:
        listener.stop()


def test_a_listener_keeps_which_machine_each_change_concerns() -> None:
    listener = ChangeListener("", last_change)  # not started: fed by hand
    listener._set(10, seed=True)
    listener.heard(["11 web-01", "12", "13 web-02"])
    assert listener.published() == 13
    assert listener.touches(10, 11, "web-01") and not listener.touches(10, 11, "web-02")
    assert listener.touches(11, 12, "web-02")  # a bare number: every machine's
    assert not listener.touches(12, 13, "web-01") and listener.touches(12, 13, "web-02")
    assert listener.touches(9, 13, "web-03")  # before the seed: not heard, so unknown
    # Only the last RING are kept: a view behind the forgotten ones trusts nothing.
    listener.heard([f"{s} m-{s}" for s in range(14, 14 + pg_notify.RING)])
    last = 13 + pg_notify.RING
    assert listener.touches(13, 14, "web-03")
    assert not listener.touches(last - 1, last, "web-03")
    # Nor does one further behind than a request looks through.
    assert listener.touches(last - pg_notify.SCAN - 1, last, "web-03")
    assert not listener.touches(last - pg_notify.SCAN, last, "web-03")


def register(store: PgStore, *ids: str) -> None:
    with store.transaction() as conn:
        for machine_id in ids:
            machines.register(conn, machine_id, [], Lifecycle.ACTIVE, utcnow())


def test_changes_are_numbered_in_the_order_they_commit(postgres_url: str) -> None:
    """A sequence numbers rows at insert; a reader of the rows after the last it applied
    would miss one that commits later with a lower number. So rows are numbered again
    at commit, under locks.CHANGES: the change written first but committed last gets
    the higher number, and the numbers run on without a gap."""
    store = PgStore(postgres_url, max_size=4)
    try:
        register(store, "a", "b")
        with store.lookup() as conn:
            before = int(
                conn.execute("SELECT coalesce(max(seq), 0) FROM cache_changes").fetchone()[0]
            )
        with psycopg.connect(postgres_url) as first:  # a transaction left open
            first.execute("UPDATE machines SET lifecycle = 'maintenance' WHERE id = 'a'")
            pending = first.execute("SELECT seq FROM cache_changes WHERE seq < 0").fetchall()
            assert len(pending) == 1  # its own row, numbered only at its commit
            with store.transaction() as conn:  # not held up by the open one
                report_cache.note_machine(conn, "b")
            first.commit()
        with store.lookup() as conn:
            rows = conn.execute(
                "SELECT seq, machine_id FROM cache_changes WHERE seq > ? ORDER BY seq", (before,)
            ).fetchall()
        assert [(r[0] - before, r[1]) for r in rows] == [(1, "b"), (2, "a")]
    finally:
        store.close()


def test_a_change_written_before_a_row_lock_cannot_deadlock_a_report(postgres_url: str) -> None:
    """A tick notes a change, then locks a machine's row; meanwhile a report's UPDATE
    of that machine took the row and wrote its change. Were locks.CHANGES taken with
    the first change, the report would wait for the tick and the tick for the report
    (PostgreSQL aborts one after a second); taken at commit, the tick waits for the
    report's commit and then goes on: both succeed."""
    store = PgStore(postgres_url, max_size=4)
    try:
        register(store, "a")
        noted, updated = threading.Event(), threading.Event()
        outcomes: dict[str, BaseException | None] = {}

        def tick() -> None:
            try:
                with store.transaction() as conn:
                    report_cache.note_members(conn, "r-1", 0, 10)
                    noted.set()
                    updated.wait(2)  # (with the lock taken early, the report blocks)
                    conn.execute("SELECT 1 FROM machines WHERE id = 'a' FOR UPDATE")
                outcomes["tick"] = None
            except BaseException as e:
                outcomes["tick"] = e

        def report() -> None:
            try:
                with psycopg.connect(postgres_url) as conn:
                    noted.wait(10)
                    conn.execute("UPDATE machines SET lifecycle = 'maintenance' WHERE id = 'a'")
                    updated.set()
                    wait_until("the tick waiting for the row", lambda: waiting(postgres_url))
                    conn.commit()
                outcomes["report"] = None
            except BaseException as e:
                outcomes["report"] = e

        threads = [threading.Thread(target=f) for f in (tick, report)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert outcomes == {"tick": None, "report": None}
    finally:
        store.close()


def waiting(url: str) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND datname = current_database()"
        ).fetchone()
    return bool(row and row[0])


def test_a_replica_knows_its_own_changes_at_once_and_the_others_within_a_second(
    postgres_url: str,
) -> None:
    here, there = PgStore(postgres_url, max_size=4), PgStore(postgres_url, max_size=4)
    try:
        register(there, "a", "b")
        listening = (here, there)
        wait_until(
            "the listeners", lambda: all(s.published_changes() is not None for s in listening)
        )
        start = here.published_changes()
        assert start is not None
        with there.transaction() as conn:
            report_cache.note_machine(conn, "a")
        assert there.published_changes() == start + 1  # before any notification
        assert there.changes_touch(start, start + 1, "a")
        assert not there.changes_touch(start, start + 1, "b")
        began = time.monotonic()
        wait_until("the other replica", lambda: here.published_changes() == start + 1)
        assert time.monotonic() - began < 1.0
        assert here.changes_touch(start, start + 1, "a")
        assert not here.changes_touch(start, start + 1, "b")
        with pytest.raises(RuntimeError), there.transaction() as conn:
            report_cache.note_machine(conn, "b")
            raise RuntimeError("rolled back: neither number nor NOTICE counts")
        assert there.published_changes() == start + 1
        with there.transaction() as conn:
            report_cache.note_members(conn, "r-1", 0, 10)
        last = there.published_changes()
        assert last is not None and last > start + 1  # the rolled-back number is a gap
        assert there.changes_touch(start + 1, last, "b")  # every machine
        wait_until("the other replica", lambda: here.published_changes() == last)
        assert here.changes_touch(start + 1, last, "b")
    finally:
        here.close()
        there.close()


def test_a_store_whose_listener_was_cut_off_trusts_nothing_until_it_is_back(
    postgres_url: str,
) -> None:
    here, there = PgStore(postgres_url, max_size=4), PgStore(postgres_url, max_size=4)
    try:
        register(there, "a", "b")
        wait_until("the listener", lambda: here.published_changes() is not None)
        start = here.published_changes()
        assert start is not None
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                "application_name = 'nixfleet-listen' AND datname = current_database()"
            )
            wait_until("the listener to notice", lambda: here.published_changes() is None)
            with there.transaction() as conn:  # while it is away
                report_cache.note_machine(conn, "a")
        wait_until("the listener to be back", lambda: here.published_changes() is not None)
        back = here.published_changes()
        assert back == start + 1
        # It did not hear which machine that was: every machine waits for the view.
        assert here.changes_touch(start, back, "b")
        assert not here.changes_touch(back, back, "b")
    finally:
        here.close()
        there.close()
