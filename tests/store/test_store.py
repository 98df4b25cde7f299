"""The SQLite store on real files: migrations, tags, reports."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from conftest import store_before

from nixfleet.errors import ConflictError, GoneError, NotFoundError
from nixfleet.models import Lifecycle, Report, isoformat, utcnow
from nixfleet.store import Store, history, machines
from nixfleet.store.migrations import MIGRATIONS

GEN_A = "/nix/store/" + "a" * 32 + "-nixos-system-a"
GEN_B = "/nix/store/" + "b" * 32 + "-nixos-system-b"


def report(machine_id: str, gen: str = GEN_A, **kw: object) -> Report:
    return Report(machine_id=machine_id, received_at=utcnow(), current_generation=gen, **kw)  # type: ignore[arg-type]


def test_fresh_and_migrated_files_open_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    first = Store(path)
    assert first.applied_migrations() == sorted(name for name, _ in MIGRATIONS)
    first.close()
    second = Store(path)
    assert second.migrate() == []
    assert second.applied_migrations() == sorted(name for name, _ in MIGRATIONS)
    mode = second.connection().execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    second.close()


def test_tags_json_is_filled_by_its_migration_and_kept_by_triggers(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with store_before(path, "0007") as old, old.transaction() as conn:
        # the machines and tags as the code of then wrote them (today's registration
        # also notes a change in cache_changes, from 0014)
        for machine_id in ("a", "b"):
            conn.execute(
                "INSERT INTO machines (id, lifecycle, registered_at) VALUES (?, 'active', ?)",
                (machine_id, isoformat(utcnow())),
            )
        # operator tags web, prod and what a report with agent tags web, eu wrote,
        # in the table of then (today's code writes machine_tag_rows, from 0022)
        conn.execute(
            "INSERT INTO machine_tags VALUES ('a', 'web', 'operator'), "
            "('a', 'prod', 'operator'), ('a', 'web', 'agent'), ('a', 'eu', 'agent')"
        )
    s = Store(path)

    def tags_json() -> dict[str, str]:
        return dict(s.connection().execute("SELECT id, tags_json FROM machines").fetchall())

    assert tags_json() == {"a": '["eu","prod","web"]', "b": "[]"}
    with s.transaction() as conn:
        machines.remove_tags(conn, "a", ["web"])  # still an agent tag
        machines.set_tags(conn, "b", ["z", "a"], "operator", replace=False)
    assert tags_json() == {"a": '["eu","prod","web"]', "b": '["a","z"]'}
    with s.transaction() as conn:
        machines.record_report(conn, report("a", tags=()))
        conn.execute(  # machine_tags is a view of these rows since 0022
            "UPDATE machine_tag_rows SET machine = (SELECT num FROM machine_numbers "
            "WHERE machine_id = 'a') WHERE machine = (SELECT num FROM machine_numbers "
            "WHERE machine_id = 'b') AND tag = 'z'"
        )
    assert tags_json() == {"a": '["prod","z"]', "b": '["a"]'}
    s.close()


def test_failed_migration_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "fleet.db"
    Store(path).close()
    broken = [*MIGRATIONS, ("9999_broken", "CREATE TABLE t (x); INSERT INTO nope VALUES (1)")]
    monkeypatch.setattr("nixfleet.store.db.MIGRATIONS", broken)
    with pytest.raises(sqlite3.OperationalError):
        Store(path)
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT name FROM sqlite_master WHERE name = 't'").fetchone() is None
    assert "9999_broken" not in {r[0] for r in conn.execute("SELECT name FROM schema_migrations")}


def register(
    store: Store, machine_id: str, tags: list[str], lifecycle: Lifecycle = Lifecycle.PENDING
) -> None:
    with store.transaction() as conn:
        machines.register(conn, machine_id, tags, lifecycle, utcnow())


def test_tag_filter_matches_machines_carrying_all_tags(store: Store) -> None:
    register(store, "web-01", ["prod", "web"])
    register(store, "web-02", ["staging", "web"])
    register(store, "db-01", ["prod", "db"])
    with store.read() as conn:
        assert machines.machine_ids(conn, ["prod"]) == ["db-01", "web-01"]
        assert machines.machine_ids(conn, ["prod", "web"]) == ["web-01"]
        assert machines.machine_ids(conn, ["web", "prod", "web"]) == ["web-01"]
        assert machines.machine_ids(conn, ["prod", "nope"]) == []
        assert machines.machine_ids(conn, []) == ["db-01", "web-01", "web-02"]
        assert machines.machine_ids(conn, [], "pending") == ["db-01", "web-01", "web-02"]
        assert machines.machine_ids(conn, [], "active") == []


def test_agent_tags_replace_the_previous_agent_set_and_union_with_operator_tags(
    store: Store,
) -> None:
    register(store, "web-01", ["canary"])
    with store.transaction() as conn:
        machines.record_report(conn, report("web-01", tags=("prod", "web")))
        machines.record_report(conn, report("web-01", tags=("prod", "eu")))
        m = machines.get(conn, "web-01")
    assert m.agent_tags == ("eu", "prod")
    assert m.operator_tags == ("canary",)
    assert m.tags == ("canary", "eu", "prod")
    with store.transaction() as conn:
        machines.record_report(conn, report("web-01", tags=None))  # tags omitted
        assert machines.get(conn, "web-01").agent_tags == ("eu", "prod")
        machines.record_report(conn, report("web-01", tags=()))
        assert machines.get(conn, "web-01").tags == ("canary",)


def test_first_report_activates_pending_and_provisioning(store: Store) -> None:
    register(store, "a", [])
    register(store, "b", [], Lifecycle.PROVISIONING)
    register(store, "c", [], Lifecycle.MAINTENANCE)
    with store.transaction() as conn:
        _, promoted_a = machines.record_report(conn, report("a"))
        _, promoted_b = machines.record_report(conn, report("b"))
        _, promoted_c = machines.record_report(conn, report("c"))
        states = {m.id: m.lifecycle for m in machines.list_machines(conn)}
    assert (promoted_a, promoted_b, promoted_c) == (Lifecycle.PENDING, Lifecycle.PROVISIONING, None)
    assert states == {"a": Lifecycle.ACTIVE, "b": Lifecycle.ACTIVE, "c": Lifecycle.MAINTENANCE}


def test_decommissioned_report_is_refused_and_changes_nothing(store: Store) -> None:
    register(store, "old", [], Lifecycle.ACTIVE)
    with store.transaction() as conn:
        machines.set_lifecycle(conn, "old", Lifecycle.DECOMMISSIONED)
    with pytest.raises(GoneError), store.transaction() as conn:
        machines.record_report(conn, report("old", tags=("x",)))
    with store.read() as conn:
        m = machines.get(conn, "old")
        kinds = [e.kind.value for e in history.latest(conn, "old", 10)]
    assert m.current_generation is None and m.tags == ()
    assert kinds == ["lifecycle"]  # active -> decommissioned; the refused report left nothing


def test_unknown_machine_and_duplicate_registration(store: Store) -> None:
    with pytest.raises(NotFoundError), store.transaction() as conn:
        machines.record_report(conn, report("ghost"))
    register(store, "web-01", [])
    with pytest.raises(ConflictError, match="already registered"):
        register(store, "web-01", [])


def test_failed_generation_is_recorded_and_cleared_by_success(store: Store) -> None:
    register(store, "a", [])
    with store.transaction() as conn:
        machines.set_desired(conn, "a", GEN_B, None, "operator", utcnow())
        machines.record_report(
            conn,
            report("a", GEN_A, success=False, attempted_generation=GEN_B, message="rolled back"),
        )
        assert machines.get(conn, "a").sync.value == "failed"
        machines.record_report(conn, report("a", GEN_B))
        m = machines.get(conn, "a")
    assert m.failed_generation is None and m.sync.value == "in sync"


def test_a_failed_transaction_writes_nothing(store: Store) -> None:
    register(store, "a", [])
    with pytest.raises(ConflictError), store.transaction() as conn:
        machines.set_tags(conn, "a", ["x"], "operator", replace=False)
        machines.set_lifecycle(conn, "a", Lifecycle.MAINTENANCE)  # invalid from pending
    with store.read() as conn:
        assert machines.get(conn, "a").tags == ()


def test_reports_take_the_same_path_whatever_the_lifecycle(store: Store) -> None:
    """The one-statement path (active, maintenance) and the general one agree."""
    for name in ("act", "mnt"):
        register(store, name, [])
    with store.transaction() as conn:
        machines.record_report(conn, report("act", tags=("a",)))  # pending -> active
        machines.record_report(conn, report("mnt", tags=("a",)))
        machines.set_lifecycle(conn, "mnt", Lifecycle.MAINTENANCE)
        machines.set_desired(conn, "mnt", GEN_B, "https://cache", "operator", utcnow())
    with store.transaction() as conn:
        for i in range(5):
            row, promoted = machines.record_report(
                conn, report("mnt", message=f"m{i}", tags=("b", "a") if i else ("a",))
            )
            assert promoted is None
            assert (row["desired_generation"], row["desired_cache_url"]) == (GEN_B, "https://cache")
        m = machines.get(conn, "mnt")
    assert m.lifecycle is Lifecycle.MAINTENANCE and m.agent_tags == ("a", "b")
    assert m.last_message == "m4"


def test_checkpoint_job_keeps_the_wal_bounded(tmp_path: Path) -> None:
    """Commits never checkpoint; the background job does, and the WAL stays small."""
    from nixfleet.controlplane import background
    from nixfleet.settings import Settings
    from nixfleet.store.db import WAL_SIZE_LIMIT

    path = tmp_path / "fleet.db"
    store = Store(path)
    wal = Path(str(path) + "-wal")
    blob = "x" * 4000
    for i in range(3000):  # ~3,000 pages: automatic checkpoints would have run
        with store.transaction() as conn:
            machines.register(conn, f"m-{i:05d}", [], Lifecycle.ACTIVE, utcnow())
            conn.execute("UPDATE machines SET last_message = ? WHERE id = ?", (blob, f"m-{i:05d}"))
    assert wal.stat().st_size > 3000 * 4096  # nothing was checkpointed inside a commit
    background.checkpoint(Settings(), store)
    with store.transaction() as conn:  # the next commit starts the WAL over
        machines.request_retry(conn, "m-00000", utcnow())
    assert wal.stat().st_size <= WAL_SIZE_LIMIT
    store.close()
    reopened = Store(path)
    assert machines.count(reopened.connection()) == 3000
    reopened.close()
