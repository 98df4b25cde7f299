"""Change numbers reach every replica's listener, committed ones only (real PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from conftest import wait_until
from postgres_cluster import import_psycopg

import_psycopg()  # skip (a .venv without the extra) or fail (CI) before the imports below
import psycopg  # noqa: E402

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
