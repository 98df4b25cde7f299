"""Which machines a published change concerns: store.changes' file on SQLite (across
processes), the listener's notifications on PostgreSQL (store.pg_notify)."""

from __future__ import annotations

from pathlib import Path

from conftest import wait_until

from nixfleet.models import Lifecycle, utcnow
from nixfleet.store import Store, changes, machines, report_cache
from nixfleet.store.conn import AnyStore


def test_published_rows_name_their_machines_and_rollout_rows_name_every_one(
    any_store: AnyStore,
) -> None:
    store = any_store
    with store.transaction() as conn:
        for m in ("a", "b"):
            machines.register(conn, m, [], Lifecycle.ACTIVE, utcnow())
    wait_until("the changes published", lambda: store.published_changes() is not None)
    start = store.published_changes()
    assert start is not None
    with store.transaction() as conn:
        report_cache.note_machine(conn, "a")
    published = store.published_changes()  # known when the commit returns
    assert published == start + 1
    assert store.changes_touch(start, published, "a")
    assert not store.changes_touch(start, published, "b")
    assert not store.changes_touch(published, published, "a")
    with store.transaction() as conn:
        report_cache.note_members(conn, "r-1", 0, 10)
    last = store.published_changes()
    assert last is not None and store.changes_touch(published, last, "b")  # every machine
    # A reader far behind (more rows than a request looks through) trusts nothing.
    assert store.changes_touch(last - changes.SCAN - 1, last, "b")


def test_another_process_maps_the_same_file(store: Store) -> None:
    with store.transaction() as conn:
        for m in ("a", "b"):
            machines.register(conn, m, [], Lifecycle.ACTIVE, utcnow())
    start = store.published_changes()
    assert start is not None
    with store.transaction() as conn:
        report_cache.note_machine(conn, "a")
        report_cache.note_members(conn, "r-1", 0, 10)
    last = store.published_changes()
    assert last == start + 2
    other = changes.ChangeSignal(Path(f"{store.path}.changes"))
    assert other.published() == last
    assert not other.touches(start, start + 1, changes.key("b"))
    assert other.touches(start, start + 1, changes.key("a"))
    assert other.touches(start + 1, last, changes.key("b"))
    assert other.touches(last - changes.SCAN - 1, last, changes.key("b"))
    other.close()


def test_a_file_left_by_another_database_is_corrected_by_the_next_commit(tmp_path: Path) -> None:
    signal = changes.ChangeSignal(tmp_path / "fleet.db.changes")
    signal.publish(([], 10**6))  # what an earlier database of that name left
    signal.close()
    store = Store(tmp_path / "fleet.db")  # its migrations commit, and publish
    try:
        published = store.published_changes()
        assert published is not None and published < 10**6
    finally:
        store.close()


def test_rows_across_the_ring_end_are_read_and_an_overwritten_slot_is_unknown(
    tmp_path: Path,
) -> None:
    signal = changes.ChangeSignal(tmp_path / "fleet.db.changes")
    start = changes.RING - 4  # rows start+1 … start+7: four slots before the end, three after
    last = start + 7
    signal.publish(([(s, 1000 + s) for s in range(start + 1, last + 1)], last))
    try:
        assert signal.touches(start, last, 1000 + start + 2)  # before the ring's end
        assert signal.touches(start, last, 1000 + last)  # after it
        assert not signal.touches(start, last, 5)
        assert not signal.touches(start + 2, last, 1000 + start + 2)  # already applied
        assert not signal.touches(last, last, 1000 + last)
        # A writer far ahead reuses the slot of start+3: that row is unknown now.
        signal.publish(([(start + 3 + changes.RING, 7)], start + 3 + changes.RING))
        assert signal.touches(start, last, 5)
        assert not signal.touches(start + 3, last, 5)
        signal.publish(([(last + 1, changes.GLOBAL)], last + 1))
        assert signal.touches(start + 3, last + 1, 5)  # a rollout's row concerns every machine
    finally:
        signal.close()
