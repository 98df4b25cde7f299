"""migrate-db (store.migrate_db, controlplane.migrate_db): an SQLite fleet with every
table written by the store's own functions, copied into a new PostgreSQL database and
read back the same, row for row and through the store; and what it refuses, leaving
the target as it was."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import urllib.parse
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import store_before
from postgres_cluster import Server, import_psycopg

from nixfleet import reconciler
from nixfleet.flake import release_from_document
from nixfleet.models import HealthCheckResult, HealthResult, Lifecycle, Report
from nixfleet.policy import fleet as fleet_policy
from nixfleet.settings import Webhook
from nixfleet.store import (
    Store,
    audit,
    credentials,
    enrollment,
    history,
    leases,
    machines,
    releases,
    rollout_files,
    sessions,
    webhooks,
)
from nixfleet.store import rollouts as store_rollouts

import_psycopg()  # skip (a .venv without the extra) or fail (CI) before the imports below
import psycopg  # noqa: E402

from nixfleet.controlplane.migrate_db import command  # noqa: E402
from nixfleet.errors import ConflictError, DatabaseFileError, ServiceError  # noqa: E402
from nixfleet.store import migrate_db  # noqa: E402
from nixfleet.store.migrate_db import migrate  # noqa: E402
from nixfleet.store.pg import PgStore  # noqa: E402

T0 = datetime(2026, 12, 7, 10, 0, tzinfo=UTC)  # a Monday
HOSTS = [f"web-{i:02}" for i in range(46)] + ["db-1", "db-2", "db-3", "db-4"]
HOOK = Webhook("http://127.0.0.1:1/hook", "/secret")
FLEET = fleet_policy.from_settings(reboot_groups=[{"tags": ["db"], "slots": 1}], reboot_slots=2)
# Tables that no migration writes a row into: empty in a target refused or failed.
SEEDLESS = {"machines", "api_keys", "machine_events", "audit", "cache_changes"}
LIVE_TABLES = {"sqlite_sequence", "sqlite_stat1", "schema_migrations"}  # not compared as rows


def gen(host: str, salt: str) -> str:
    return f"/nix/store/{salt * 32}-nixos-system-{host}"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def report(store: Store, host: str, when: datetime, path: str, **kw: Any) -> None:
    results = tuple(HealthCheckResult(n, "systemd", True, 2) for n in ("nginx", "ping"))
    r = Report(
        host,
        when,
        path,
        health=HealthResult(True, results),
        tags=("eu",),
        agent_version="0.1.0",
        **kw,
    )
    with store.transaction() as conn:
        machines.record_report(conn, r)


def build(path: Path) -> None:
    """A fleet of 50 machines with a row in every table, written as the control plane does."""
    store = Store(path)
    try:
        with store.transaction() as conn:
            credentials.create_key(conn, "ops", "admin", "test", T0)
            credentials.create_key(conn, "old", "readonly", "test", T0)
            credentials.revoke_key(conn, "old", at(1))
            sessions.create(conn, "ops", T0)
            enrollment.create(
                conn,
                uses=3,
                lifetime=timedelta(days=1),
                tags=["web"],
                hostname_glob="web-*",
                created_by="key:ops",
                now=T0,
            )
            for h in HOSTS:
                tags = ["db"] if h.startswith("db") else ["web"]
                machines.register(conn, h, tags, Lifecycle.ACTIVE, T0)
                credentials.issue_token(conn, h, T0)
                audit.record(conn, "key:ops", "machine.register", h, T0, {"tags": tags})
        for h in HOSTS:
            report(store, h, at(10), gen(h, "a"))
        rel = release_from_document(
            {
                "cache_url": "https://cache.example.com",
                "entries": [
                    {"hostname": h, "store_path": gen(h, "b"), "platform": "x86_64-linux"}
                    for h in HOSTS
                ],
            }
        )
        doc = {
            "version": 1,
            "name": "kernel",
            "release": rel.id,
            "target": {"hosts": HOSTS},
            "strategy": "staged",
            "batches": [4, "100%"],
            "health_timeout": "5m",
            "reboot": "when-needed",
        }
        with store.transaction() as conn:
            releases.insert(conn, rel, at(20), "key:ops")
            rid = store_rollouts.apply(conn, doc, "key:ops", at(20), 5).id
            rollout_files.record_file(
                conn,
                "/etc/nixfleet/rollouts/kernel.json",
                at(20),
                name="kernel",
                rollout_id=rid,
                mtime_ns=1_700_000_000_000_000_000,
            )
        reconciler.tick(store, 5, at(21))
        with store.read() as conn:
            first = [
                m.id for m in machines.list_machines(conn) if m.desired_generation == gen(m.id, "b")
            ]
        assert first, "the first batch is deploying"
        for h in first[:-1]:  # the desired path, then the report of it: a back-reference
            report(store, h, at(22), gen(h, "b"), needs_reboot=True)
        report(  # a failed switch: machine.failed in the outbox
            store,
            first[-1],
            at(22),
            gen(first[-1], "a"),
            success=False,
            message="switch failed",
            attempted_generation=gen(first[-1], "b"),
        )
        with store.transaction() as conn:
            leases.take(conn, first[0], FLEET, at(23), f"machine:{first[0]}")
            webhooks.fan_out(conn, [HOOK], at(24), 3600)
            claimed = webhooks.claim(conn, HOOK.url, at(24), 30)
            assert claimed is not None
            webhooks.record_attempt(conn, claimed.delivery_id, at(24), 500, "boom", 12, at(84))
            webhooks.detect_stale(conn, at(4000), 60)
        reconciler.tick(store, 5, at(25))
        with store.transaction() as conn:  # SQLite's AUTOINCREMENT mark stays above the rest
            conn.execute(
                "DELETE FROM cache_changes WHERE seq = (SELECT max(seq) FROM cache_changes)"
            )
    finally:
        store.close()


@pytest.fixture(scope="module")
def fleet_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("migrate") / "fleet.db"
    build(path)
    conn = sqlite3.connect(path)
    backs = conn.execute(
        "SELECT count(*) FROM machine_events WHERE typeof(generation) = 'integer'"
    ).fetchone()[0]
    conn.close()
    assert backs > 0, "the fleet holds history rows whose generation is a back-reference"
    return path


@pytest.fixture
def source(fleet_db: Path, tmp_path: Path) -> Path:
    """A copy of the fleet's file of this test's own (a test may change it)."""
    path = tmp_path / "fleet.db"
    shutil.copy(fleet_db, path)
    return path


def split(generation: object) -> tuple[object, object]:
    """SQLite's untyped generation as PostgreSQL's (generation, generation_back)."""
    return (None, generation) if isinstance(generation, int) else (generation, None)


def lite_rows(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every table's rows, sorted, in PostgreSQL's spelling: machine_events' generation
    as (path, None) or (None, k), as 0004_baseline.sql's header says."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    out: dict[str, list[tuple[Any, ...]]] = {}
    try:
        for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
            if table in LIVE_TABLES:
                continue
            rows = [tuple(r) for r in conn.execute(f"SELECT * FROM {table}")]
            if table == "machine_events":  # machine, seq, at, kind, source, generation, detail
                rows = [(*r[:5], *split(r[5]), r[6]) for r in rows]
            out[table] = sorted(rows, key=repr)
    finally:
        conn.close()
    return out


def pg_rows(url: str) -> dict[str, list[tuple[Any, ...]]]:
    out: dict[str, list[tuple[Any, ...]]] = {}
    with psycopg.connect(url) as conn:
        tables = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' "
            "AND table_type = 'BASE TABLE'"
        ).fetchall()
        for (table,) in tables:
            if table in LIVE_TABLES:
                continue
            rows = conn.execute(f"SELECT * FROM {table}").fetchall()
            out[table] = sorted((tuple(r) for r in rows), key=repr)
    return out


def pg_tables(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchone()
        assert row is not None
        return int(row[0])


@pytest.fixture
def target(postgres_url: str) -> str:
    """A new PostgreSQL database, not yet migrated."""
    return postgres_url


def test_every_table_is_copied_row_for_row(source: Path, target: str) -> None:
    want = lite_rows(source)
    assert all(want.values()), [t for t, rows in want.items() if not rows]  # all written
    copied = migrate(source, target)
    got = pg_rows(target)
    assert {c.table: c.rows for c in copied} == {t: len(rows) for t, rows in want.items()}
    assert got.pop("leadership") == [(1, 0, None, None)]  # PostgreSQL's own, as seeded
    assert got.keys() == want.keys()
    for table in want:
        assert got[table] == want[table], table
    names = [c.table for c in copied]
    assert names.index("machines") < names.index("machine_numbers")  # parents first
    assert names.index("machine_numbers") < names.index("machine_events")
    assert names.index("webhook_deliveries") < names.index("webhook_attempts")


def test_the_history_reads_back_the_same_through_the_store(source: Path, target: str) -> None:
    migrate(source, target)
    lite, pg = Store(source), PgStore(target, max_size=2)
    try:
        with lite.read() as a, pg.read() as b:
            for h in HOSTS:
                events = history.page(a, h, limit=1000).events
                assert events and history.page(b, h, limit=1000).events == events, h
                assert history.latest(b, h, 3) == history.latest(a, h, 3)
            assert history.count(b) == history.count(a)
            assert machines.list_machines(b) == machines.list_machines(a)
    finally:
        lite.close()
        pg.close()


def test_the_ids_go_on_after_the_copied_ones(source: Path, target: str) -> None:
    migrate(source, target)
    lite = sqlite3.connect(source)
    mark = lite.execute("SELECT seq FROM sqlite_sequence WHERE name = 'cache_changes'").fetchone()
    lite.close()
    with psycopg.connect(target) as conn:
        row = conn.execute(
            "SELECT nextval(pg_get_serial_sequence('cache_changes', 'seq')), max(seq) "
            "FROM cache_changes"
        ).fetchone()
        assert row is not None and row[1] < mark[0]  # the newest change was pruned
        assert row[0] == mark[0] + 1  # past SQLite's AUTOINCREMENT mark, not just the rows
        serials = conn.execute(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = 'public' AND is_identity = 'YES'"
        ).fetchall()
        assert len(serials) >= 8
        for table, column in serials:
            row = conn.execute(
                f"SELECT nextval(pg_get_serial_sequence('{table}', '{column}')), "
                f"(SELECT max({column}) FROM {table})"
            ).fetchone()
            assert row is not None and row[0] > (row[1] or 0), table
    store = PgStore(target, max_size=2)
    try:  # new rows get new ids, and the triggers are back on
        with store.transaction() as conn:
            machines.register(conn, "web-new", ["web"], Lifecycle.ACTIVE, at(100))
            audit.record(conn, "key:ops", "machine.register", "web-new", at(100))
            history.source_id(conn, "rollout:new")
        report_pg = Report("web-new", at(101), gen("web-new", "a"))
        with store.transaction() as conn:
            machines.record_report(conn, report_pg)
        with store.read() as conn:
            assert [e.kind.value for e in history.page(conn, "web-new").events][-1] == "generation"
            num = conn.execute(
                "SELECT num FROM machine_numbers WHERE machine_id = 'web-new'"
            ).fetchone()[0]
            assert num == len(HOSTS) + 2  # after the copied ones and the nextval above
            assert machines.get(conn, "web-new").tags == ("web",)  # tags_json by its trigger
    finally:
        store.close()


def test_the_command_prints_each_table_and_runs_as_a_program(source: Path, target: str) -> None:
    result = CliRunner().invoke(command, ["--from", f"sqlite:{source}", "--to", target])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines][:2] == ["api_keys", "audit"]
    assert {line.split()[0] for line in lines} == set(lite_rows(source))
    assert f"migrated sqlite:{source} to {target}" in result.stderr
    again = subprocess.run(  # the same again, as an operator runs it: refused, exit 4
        [
            sys.executable,
            "-c",
            "from nixfleet.controlplane.migrate_db import command; command()",
            "--from",
            str(source),
            "--to",
            target,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert again.returncode == 4, again.stderr
    assert again.stderr.startswith("migrate-db: error: ")
    assert "is not empty: rows in" in again.stderr and not again.stdout


def test_a_new_database_is_copied_by_the_program(source: Path, target: str) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from nixfleet.controlplane.migrate_db import command; command()",
            "--from",
            f"sqlite:{source}",
            "--to",
            target,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "machine_events" in proc.stdout
    assert pg_rows(target)["machines"] == lite_rows(source)["machines"]


@pytest.mark.parametrize(
    "used",
    [
        "INSERT INTO api_keys VALUES ('k', 'admin', 'h', 'now', 'test', NULL)",
        "UPDATE leadership SET epoch = 1",  # a replica led it
        "INSERT INTO event_sources (name) VALUES ('rollout:x')",
    ],
)
def test_a_target_that_is_not_empty_is_refused_and_left_alone(
    source: Path, target: str, used: str
) -> None:
    PgStore(target, max_size=1).close()
    with psycopg.connect(target) as conn:
        conn.execute(used)
    before = pg_rows(target)
    with pytest.raises(ConflictError) as e:
        migrate(source, target)
    assert "is not empty" in e.value.detail and "createdb" in e.value.detail
    assert pg_rows(target) == before


def test_a_source_not_fully_migrated_is_refused_before_the_target_is_touched(
    tmp_path: Path, target: str
) -> None:
    path = tmp_path / "old.db"
    with store_before(path, "0024_paths_without_host_names"):
        pass
    with pytest.raises(DatabaseFileError) as e:
        migrate(path, target)
    assert "not fully migrated (missing 0024_paths_without_host_names)" in e.value.detail
    assert "start this version's control plane on it once" in e.value.detail
    assert pg_tables(target) == 0


def test_a_source_newer_than_this_code_is_refused(source: Path, target: str) -> None:
    conn = sqlite3.connect(source)
    conn.execute("INSERT INTO schema_migrations VALUES ('9999_future', '2027-01-01')")
    conn.commit()
    conn.close()
    result = CliRunner().invoke(command, ["--from", str(source), "--to", target])
    assert result.exit_code == 7
    assert "migrated by a newer nixfleet (migrations 9999_future" in result.stderr
    assert pg_tables(target) == 0


def test_a_target_migrated_by_a_newer_version_is_refused(source: Path, target: str) -> None:
    PgStore(target, max_size=1).close()
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_migrations VALUES ('9999_future', '2027-01-01')")
    result = CliRunner().invoke(command, ["--from", str(source), "--to", target])
    assert result.exit_code == 7
    assert "migrated by a newer nixfleet (migrations 9999_future" in result.stderr
    with psycopg.connect(target) as conn:
        assert conn.execute("SELECT count(*) FROM machines").fetchone() == (0,)


def test_a_password_in_the_url_is_refused(source: Path, target: str) -> None:
    parts = urllib.parse.urlsplit(target)
    with_password = parts._replace(netloc=f"{parts.username}:secret@{parts.hostname}:{parts.port}")
    result = CliRunner().invoke(
        command, ["--from", str(source), "--to", urllib.parse.urlunsplit(with_password)]
    )
    assert result.exit_code == 2
    assert "--to" in result.stderr and "holds a password" in result.stderr
    assert "secret" not in result.output
    assert pg_tables(target) == 0
    result = CliRunner().invoke(command, ["--from", target, "--to", target])
    assert result.exit_code == 2 and "expected sqlite:PATH" in result.stderr


@pytest.mark.parametrize("side", ["sqlite", "postgresql"])
def test_a_table_without_its_twin_fails_clearly(source: Path, target: str, side: str) -> None:
    if side == "sqlite":
        conn = sqlite3.connect(source)
        conn.execute("CREATE TABLE extra_notes (id INTEGER PRIMARY KEY, note TEXT)")
        conn.execute("INSERT INTO extra_notes (note) VALUES ('not copied?')")
        conn.commit()
        conn.close()
        expected = "SQLite's table extra_notes has none in PostgreSQL"
    else:
        PgStore(target, max_size=1).close()
        with psycopg.connect(target) as pg:
            pg.execute("CREATE TABLE extra_notes (id BIGINT PRIMARY KEY)")
        expected = "PostgreSQL's table extra_notes has none in SQLite"
    with pytest.raises(DatabaseFileError) as e:
        migrate(source, target)
    assert expected in e.value.detail
    assert all(not rows for t, rows in pg_rows(target).items() if t in SEEDLESS)


def test_a_column_without_its_twin_fails_clearly(source: Path, target: str) -> None:
    conn = sqlite3.connect(source)
    conn.execute("ALTER TABLE machines ADD COLUMN notes TEXT")
    conn.commit()
    conn.close()
    with pytest.raises(DatabaseFileError) as e:
        migrate(source, target)
    assert "SQLite's column machines.notes has none in PostgreSQL" in e.value.detail
    assert pg_rows(target)["machines"] == []


def test_a_target_in_use_is_refused_not_waited_for(
    source: Path, target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(migrate_db, "LOCK_TIMEOUT", "200ms")
    PgStore(target, max_size=1).close()
    with psycopg.connect(target) as other:  # a control plane's read, say, left open
        other.execute("SELECT count(*) FROM machines")
        with pytest.raises(ConflictError) as e:
            migrate(source, target)
    assert "is in use (a table stayed locked for 200ms)" in e.value.detail
    assert all(not rows for t, rows in pg_rows(target).items() if t in SEEDLESS)


def test_a_file_that_is_no_nixfleet_database_is_refused(tmp_path: Path, target: str) -> None:
    (tmp_path / "notes.db").write_text("not a database\n" * 100)
    sqlite3.connect(tmp_path / "empty.db").execute("CREATE TABLE t (x)").connection.close()
    for name in ("notes.db", "empty.db", "missing.db"):
        result = CliRunner().invoke(command, ["--from", str(tmp_path / name), "--to", target])
        assert result.exit_code == 7, result.output
        assert f"sqlite:{tmp_path / name}" in result.stderr
    assert pg_tables(target) == 0


def test_rows_that_break_a_foreign_key_are_refused(source: Path, target: str) -> None:
    conn = sqlite3.connect(source)  # foreign keys unchecked, as a hand edit could leave it
    conn.execute("INSERT INTO machine_tag_rows (machine, tag, source) VALUES (9999, 'x', 1)")
    conn.commit()
    conn.close()
    with pytest.raises(ServiceError) as e:
        migrate(source, target)
    assert "breaks foreign key machine_tag_rows_machine_fkey of machine_tag_rows" in e.value.detail
    assert all(not rows for t, rows in pg_rows(target).items() if t in SEEDLESS)


def schema(url: str) -> set[tuple[Any, ...]]:
    """Every constraint (by its definition) and trigger (with whether it is enabled)."""
    with psycopg.connect(url) as conn:
        constraints = conn.execute(
            "SELECT t.relname::text, c.conname::text, pg_get_constraintdef(c.oid) "
            "FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid "
            "JOIN pg_namespace n ON n.oid = t.relnamespace WHERE n.nspname = 'public'"
        ).fetchall()
        triggers = conn.execute(
            "SELECT t.relname::text, g.tgname::text, g.tgenabled::text FROM pg_trigger g "
            "JOIN pg_class t ON t.oid = g.tgrelid JOIN pg_namespace n "
            "ON n.oid = t.relnamespace WHERE n.nspname = 'public' AND NOT g.tgisinternal"
        ).fetchall()
    return {("constraint", *r) for r in constraints} | {("trigger", *r) for r in triggers}


def test_the_target_keeps_the_schema_its_migrations_made(
    source: Path, target: str, postgres_server: Server
) -> None:
    fresh = postgres_server.create_database()
    try:
        PgStore(fresh, max_size=1).close()
        migrate(source, target)
        want = schema(fresh)
        assert any(k[0] == "trigger" and k[3] == "O" for k in want)  # enabled (origin)
        assert sum(k[3].startswith("FOREIGN KEY") for k in want if k[0] == "constraint") > 10
        assert schema(target) == want
    finally:
        postgres_server.drop_database(fresh)
