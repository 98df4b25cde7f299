"""store.changes: which machines a published change concerns, across processes' files."""

from __future__ import annotations

from pathlib import Path

from nixfleet.models import Lifecycle, utcnow
from nixfleet.store import Store, changes, machines, report_cache


def test_published_rows_name_their_machines_and_rollout_rows_name_every_one(
    store: Store,
) -> None:
    with store.transaction() as conn:
        for m in ("a", "b"):
            machines.register(conn, m, [], Lifecycle.ACTIVE, utcnow())
    start = store.published_changes()
    assert start is not None
    with store.transaction() as conn:
        report_cache.note_machine(conn, "a")
    published = store.published_changes()
    assert published == start + 1
    assert store.changes_touch(start, published, "a")
    assert not store.changes_touch(start, published, "b")
    assert not store.changes_touch(published, published, "a")
    with store.transaction() as conn:
        report_cache.note_members(conn, "r-1", 0, 10)
    last = store.published_changes()
    assert last is not None and store.changes_touch(published, last, "b")  # every machine
    # A reader in another process maps the same file and sees the same.
    other = changes.ChangeSignal(Path(f"{store.path}.changes"))
    assert other.published() == last
    assert not other.touches(start, published, changes.key("b"))
    # A reader far behind (more rows than a request looks through) trusts nothing.
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
