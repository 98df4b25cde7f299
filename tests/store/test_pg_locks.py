"""PostgreSQL's explicit locks (docs/scaling.md "Transactions"), two transactions at once.

SQLite has one writer; PostgreSQL runs transactions side by side at READ COMMITTED,
so a store function that reads and then writes on what it read takes a lock. Each
test here holds a first transaction open on one connection while a second, on
another connection and thread, does what would collide with it; once the second
waits on a lock (or has ended), the first commits. Without the lock the second fails
(a unique violation) or writes a wrong row; with it, it waits and then does what it
would have done alone.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import pytest
from conftest import wait_until
from postgres_cluster import import_psycopg

from nixfleet.errors import ConflictError
from nixfleet.history import Event, EventKind
from nixfleet.models import Lifecycle, Report
from nixfleet.store import history, machines
from nixfleet.store.conn import Connection

import_psycopg()

from nixfleet.store.pg import PgStore  # noqa: E402

T0 = datetime(2026, 11, 27, 9, 0, tzinfo=UTC)
P = "/nix/store/" + "p" * 32 + "-nixos-system-web-07-v1"
T = TypeVar("T")


@pytest.fixture
def pg(postgres_url: str) -> Iterator[PgStore]:
    store = PgStore(postgres_url, max_size=4)
    yield store
    store.close()


def waiting(store: PgStore) -> bool:
    """Whether a backend of this database waits on a lock."""
    with store.lookup() as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'"
        ).fetchone()
    return bool(row[0])


def while_open(
    store: PgStore, first: Callable[[Connection], object], second: Callable[[Connection], T]
) -> tuple[bool, T]:
    """`first` in a transaction held open while `second` runs in another; whether the
    second waited on a lock, and its result (its exception is raised here)."""
    out: dict[str, object] = {}
    with store.transaction() as conn:
        first(conn)

        def run() -> None:
            try:
                with store.transaction() as other:
                    out["value"] = second(other)
            except BaseException as e:
                out["error"] = e

        thread = threading.Thread(target=run, name="second-transaction")
        thread.start()
        wait_until(
            "the second transaction to wait on a lock or end",
            lambda: not thread.is_alive() or waiting(store),
        )
        waited = thread.is_alive()
    thread.join(timeout=60)
    assert not thread.is_alive(), "the second transaction did not end"
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return waited, out["value"]  # type: ignore[return-value]


def register(store: PgStore, *ids: str) -> None:
    with store.transaction() as conn:
        for machine_id in ids:
            machines.register(conn, machine_id, [], Lifecycle.PENDING, T0)


def stored(store: PgStore, machine_id: str) -> list[tuple[int, str, str | None]]:
    with store.read() as conn:
        events = history.page(conn, machine_id, limit=100).events
    return [(e.id, e.kind.value, e.generation) for e in events]


def test_two_registrations_of_one_id_are_one_machine_and_a_conflict(pg: PgStore) -> None:
    def first(conn: Connection) -> None:
        machines.register(conn, "web-07", ["web"], Lifecycle.PENDING, T0)

    def second(conn: Connection) -> None:
        machines.register(conn, "web-07", ["db"], Lifecycle.ACTIVE, T0)

    with pytest.raises(ConflictError, match="already registered"):
        while_open(pg, first, second)
    with pg.read() as conn:
        assert [(m.id, m.tags, m.lifecycle) for m in machines.list_machines(conn)] == [
            ("web-07", ("web",), Lifecycle.PENDING)
        ]


def test_events_of_one_machine_from_two_transactions_take_the_next_seqs(pg: PgStore) -> None:
    register(pg, "web-07")

    def first(conn: Connection) -> None:
        machines.set_lifecycle(conn, "web-07", Lifecycle.ACTIVE, "operator", T0)

    def second(conn: Connection) -> None:
        history.tags_changed(conn, "web-07", T0, "operator", "operator", ["web"], [])

    waited, _ = while_open(pg, first, second)
    assert waited
    assert stored(pg, "web-07") == [(1, "lifecycle", None), (2, "tags", None)]


@pytest.mark.parametrize("desired_first", [True, False], ids=["desired-first", "report-first"])
def test_a_bulk_desired_generation_and_a_report_at_once(pg: PgStore, desired_first: bool) -> None:
    """A rollout's batch start (add_desired over many machines, one statement) and a
    report of one of them (record_report: the window its row read is from before
    the lock) in either order: each takes the next seqs, the report's path still
    refers to the desired event when that came first."""
    hosts = [f"web-{i:02}" for i in range(20)]
    register(pg, *hosts)

    def desire(conn: Connection) -> int:
        written = history.add_desired(
            conn,
            "SELECT id AS machine_id, ? AS at, 'rollout:r1' AS source, ? AS generation "
            "FROM machines WHERE desired_generation IS DISTINCT FROM ?",
            ("2026-11-27T09:00:01.000000Z", P, P),
        )
        conn.execute("UPDATE machines SET desired_generation = ?", (P,))
        return written

    def report(conn: Connection) -> None:
        machines.record_report(conn, Report("web-07", T0 + timedelta(seconds=2), P))

    if desired_first:
        waited, _ = while_open(pg, desire, report)
        assert stored(pg, "web-07") == [
            (1, "desired", P),
            (2, "lifecycle", None),
            (3, "generation", P),
        ]
        with pg.read() as conn:  # the path as a reference to the desired event
            back = conn.execute(
                "SELECT generation_back FROM machine_events WHERE seq = 3 AND machine = "
                "(SELECT num FROM machine_numbers WHERE machine_id = 'web-07')"
            ).fetchone()[0]
        assert back == 2
    else:
        waited, written = while_open(pg, report, desire)
        assert written == len(hosts)
        assert stored(pg, "web-07") == [
            (1, "lifecycle", None),
            (2, "generation", P),
            (3, "desired", P),
        ]
    assert waited
    with pg.read() as conn:
        assert history.count(conn, kind=EventKind.DESIRED) == len(hosts)


def test_pruning_waits_for_an_event_that_refers_to_one_it_deletes(pg: PgStore) -> None:
    """The report's generation event refers to the desired event the job deletes:
    the job must see it to write the path into it."""
    register(pg, "web-07")
    with pg.transaction() as conn:
        machines.set_desired(conn, "web-07", P, None, "operator", T0)
    recent = T0 + timedelta(days=30)

    def report(conn: Connection) -> None:
        machines.record_report(conn, Report("web-07", recent, P))

    def prune(conn: Connection) -> tuple[int, int | None]:
        return history.prune(conn, recent - timedelta(days=1), 1000, 0, 100)

    waited, (deleted, _) = while_open(pg, report, prune)
    assert waited and deleted == 1
    assert stored(pg, "web-07") == [(2, "lifecycle", None), (3, "generation", P)]


def test_appending_locks_only_the_machines_it_writes(pg: PgStore) -> None:
    """Another machine's events do not wait (the lock is per machine)."""
    register(pg, "web-07", "web-08")

    def first(conn: Connection) -> None:
        history.add(conn, [Event("web-07", T0, EventKind.LIFECYCLE, "operator")])

    def second(conn: Connection) -> None:
        history.add(conn, [Event("web-08", T0, EventKind.LIFECYCLE, "operator")])

    waited, _ = while_open(pg, first, second)
    assert not waited
    assert stored(pg, "web-08") == [(1, "lifecycle", None)]
