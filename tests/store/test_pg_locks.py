"""PostgreSQL's explicit locks (docs/scaling.md "Transactions"), two transactions at once.

SQLite has one writer; PostgreSQL runs transactions side by side at READ COMMITTED,
so a store function that reads and then writes on what it read takes a lock. Each
test here holds a first transaction open on one connection while a second, on
another connection and thread, does what would collide with it; once the second
waits on a lock (or has ended), the first commits. Without the lock the second fails
(a unique violation) or writes a wrong row; with it, it waits and then does what it
would have done alone. Here: a machine's events and its registration (store.history,
store.machines), a group's last reboot slot, the webhook outbox's fan-out, claims and
stale announcements, and a release pruned while it is being rolled out.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
from conftest import wait_until
from postgres_cluster import import_psycopg

from nixfleet.errors import ConflictError
from nixfleet.flake import release_from_document
from nixfleet.history import Event, EventKind
from nixfleet.models import Lifecycle, Report, utcnow
from nixfleet.policy import fleet
from nixfleet.settings import Webhook
from nixfleet.store import history, leases, machines, releases, retention
from nixfleet.store import rollouts as store_rollouts
from nixfleet.store import webhooks as outbox
from nixfleet.store.conn import Connection, Cursor

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
    report of one of them (record_report: its row read waits for the lock, and the
    window is read by the next statement) in either order: each takes the next seqs,
    the report's path still refers to the desired event when that came first."""
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


# --- reboot leases, webhooks ---------------------------------------------------------

FLEET = fleet.from_settings(reboot_groups=[{"tags": ["db"], "slots": 1}], reboot_timeout=600)
HOOK = Webhook("http://127.0.0.1:1/a", "/s", ("*",))


def test_two_machines_cannot_both_take_a_groups_last_slot(pg: PgStore) -> None:
    hosts = ["db-1", "db-2"]
    with pg.transaction() as conn:
        for h in hosts:
            machines.register(conn, h, ["db"], Lifecycle.ACTIVE, T0)
        entries = [
            {"hostname": h, "store_path": P.replace("web-07", h), "platform": "x86_64-linux"}
            for h in hosts
        ]
        rel = release_from_document({"entries": entries})
        releases.insert(conn, rel, T0, "test")
        doc = {
            "version": 1,
            "name": "kernel",
            "release": rel.id,
            "target": {"hosts": hosts},
            "strategy": "all-at-once",
            "reboot": "when-needed",
        }
        store_rollouts.apply(conn, doc, "key:test", T0, 5)

    def take(host: str) -> Callable[[Connection], object]:
        return lambda conn: leases.take(conn, host, FLEET, T0, f"machine:{host}")

    with pytest.raises(ConflictError, match=r"group db is full \(db-1\)"):
        while_open(pg, take("db-1"), take("db-2"))
    with pg.read() as conn:
        assert leases.holders(conn) == {"db-1": ["db"]}


def test_a_release_being_rolled_out_is_not_pruned(pg: PgStore) -> None:
    """prune_release checks that no rollout uses the release, then marks it pruned: a
    rollout of it applied meanwhile holds its row (the foreign key's lock)."""
    register(pg, "web-07")
    entry = {"hostname": "web-07", "store_path": P, "platform": "x86_64-linux"}
    rel = release_from_document({"entries": [entry]})
    with pg.transaction() as conn:
        releases.insert(conn, rel, T0, "test")
    now = T0 + timedelta(days=30)
    doc = {
        "version": 1,
        "name": "late",
        "release": rel.id,
        "target": {"hosts": ["web-07"]},
        "strategy": "all-at-once",
    }

    def apply(conn: Connection) -> None:
        store_rollouts.apply(conn, doc, "key:test", now, 5)

    def prune(conn: Connection) -> bool:
        return retention.prune_release(
            conn, rel.id, now - timedelta(days=14), now - timedelta(days=1), now
        )

    waited, pruned = while_open(pg, apply, prune)
    assert waited and not pruned
    with pg.read() as conn:
        assert releases.get(conn, rel.id).entries == rel.entries


def test_a_silence_is_announced_once_by_two_runs_at_once(pg: PgStore) -> None:
    now = utcnow()
    register(pg, "web-07")
    with pg.transaction() as conn:
        machines.record_report(conn, Report("web-07", now - timedelta(seconds=100), P))

    def detect(conn: Connection) -> int:
        return outbox.detect_stale(conn, now, 60)

    waited, announced = while_open(pg, detect, detect)
    assert waited and announced == 0
    with pg.read() as conn:
        row = conn.execute("SELECT count(*) FROM webhook_outbox WHERE event = 'machine.stale'")
        assert row.fetchone()[0] == 1


def deliveries(pg: PgStore) -> list[tuple[int, int]]:
    """(outbox id, deliveries) of every event."""
    with pg.read() as conn:
        rows = conn.execute(
            "SELECT o.id, count(d.id) FROM webhook_outbox o LEFT JOIN webhook_deliveries d "
            "ON d.outbox_id = o.id GROUP BY o.id ORDER BY o.id"
        ).fetchall()
    return [(r[0], r[1]) for r in rows]


def test_two_fan_outs_at_once_give_an_event_one_delivery(pg: PgStore) -> None:
    now = utcnow()
    with pg.transaction() as conn:
        outbox.add(conn, "machine.failed", now, machine_id="web-07")

    def fan_out(conn: Connection) -> int:
        return outbox.fan_out(conn, [HOOK], now, 60)

    waited, seen = while_open(pg, fan_out, fan_out)
    assert not waited and seen == 0  # the first's rows are skipped, not waited for
    assert [n for _, n in deliveries(pg)] == [1]


def test_a_claimed_delivery_is_not_claimed_again_meanwhile(pg: PgStore) -> None:
    now = utcnow()
    with pg.transaction() as conn:
        for m in ("web-07", "web-08"):
            outbox.add(conn, "machine.failed", now, machine_id=m)
        outbox.fan_out(conn, [HOOK], now, 60)

    def claim(conn: Connection) -> int | None:
        claimed = outbox.claim(conn, HOOK.url, now, lease=5)
        return None if claimed is None else claimed.delivery_id

    first: list[int | None] = []
    waited, second = while_open(pg, lambda conn: first.append(claim(conn)), claim)
    assert not waited and first[0] is not None and second not in (None, first[0])


class Before:
    """A connection that runs `action` before the first statement starting with `prefix`."""

    def __init__(self, conn: Connection, prefix: str, action: Callable[[], None]) -> None:
        self.conn, self.prefix, self.action = conn, prefix, action

    def execute(self, sql: str, parameters: Sequence[Any] | Mapping[str, Any] = (), /) -> Cursor:
        if sql.startswith(self.prefix) and self.prefix:
            self.prefix = ""
            self.action()
        return self.conn.execute(sql, parameters)

    def executemany(
        self, sql: str, parameters: Iterable[Sequence[Any] | Mapping[str, Any]], /
    ) -> Any:
        return self.conn.executemany(sql, parameters)


def test_an_event_committed_below_those_fanned_out_is_fanned_out_later(pg: PgStore) -> None:
    """Outbox ids are handed out at insert: event 1 may commit after event 2, and
    after a fan-out read 2; it must stay new for the next fan-out."""
    now = utcnow()
    written, go, committed = threading.Event(), threading.Event(), threading.Event()

    def slow_writer() -> None:
        with pg.transaction() as conn:
            outbox.add(conn, "machine.failed", now, machine_id="web-07")  # id 1
            written.set()
            go.wait(30)
        committed.set()

    thread = threading.Thread(target=slow_writer, name="slow-writer")
    thread.start()
    try:
        assert written.wait(30)
        with pg.transaction() as conn:
            outbox.add(conn, "machine.failed", now, machine_id="web-08")  # id 2

        def let_it_commit() -> None:  # between the fan-out's read and its update
            go.set()
            assert committed.wait(30)

        with pg.transaction() as conn:
            assert (
                outbox.fan_out(
                    Before(conn, "UPDATE webhook_outbox", let_it_commit), [HOOK], now, 60
                )
                == 1
            )
    finally:
        go.set()
        thread.join(timeout=60)
    with pg.transaction() as conn:
        assert outbox.fan_out(conn, [HOOK], now, 60) == 1
    assert deliveries(pg) == [(1, 1), (2, 1)]
