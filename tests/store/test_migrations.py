"""Migrations on a database written by older code: tests/store/fixtures/schema-0007.db.

The fixture was made by the code of schema 0007 (make_0007.py beside it). Opening it
with today's store migrates it; nothing may be lost, and every read must still work.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import store_before

from nixfleet.api.history import event_json
from nixfleet.history import EventKind
from nixfleet.models import (
    TIME_FORMAT,
    BatchStatus,
    Health,
    HealthResult,
    Lifecycle,
    MachineHealth,
    RolloutStatus,
    SystemState,
    health_of,
    isoformat,
    parse_time,
    utcnow,
)
from nixfleet.store import Store, credentials, event_forms, history, machines, migrations, releases
from nixfleet.store import rollouts as store_rollouts
from nixfleet.store.rows import health_from_stored, health_to_stored

FIXTURE = Path(__file__).parent / "fixtures" / "schema-0007.db"
FIXTURE_0013 = FIXTURE.with_name("schema-0013.db")  # make_0013.py; its history beside it


def _tables(path: Path) -> dict[str, list[tuple[object, ...]]]:
    conn = sqlite3.connect(path)
    try:
        names = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type IN ('table', 'view') "  # a table may
                "AND name NOT LIKE 'sqlite_%' AND name <> 'schema_migrations' ORDER BY name"  # become a view
            )
        ]
        return {n: conn.execute(f"SELECT * FROM {n} ORDER BY 1, 2").fetchall() for n in names}
    finally:
        conn.close()


@pytest.fixture
def old_db(tmp_path: Path) -> Path:
    target = tmp_path / "nixfleet.db"
    shutil.copyfile(FIXTURE, target)
    return target


def test_fixture_is_what_it_says(old_db: Path) -> None:
    conn = sqlite3.connect(old_db)
    names = [r[0] for r in conn.execute("SELECT name FROM schema_migrations ORDER BY name")]
    conn.close()
    assert names[-1] == "0007_machine_tags_json"
    short = [t for rows in _tables(old_db).values() for row in rows for t in row]
    assert any(isinstance(v, str) and len(v) == 20 and v.endswith("Z") for v in short)


def test_migrating_the_0007_fixture_loses_nothing_and_fixes_times(old_db: Path) -> None:
    before = _tables(old_db)
    store = Store(old_db)
    with store.read() as conn:
        applied = [r[0] for r in conn.execute("SELECT name FROM schema_migrations ORDER BY name")]
    store.close()
    assert applied == [name for name, _ in migrations.MIGRATIONS]
    after = _tables(old_db)
    # 0010 carries the report rows into machine_events (test below) and drops them.
    reports = before.pop("reports")
    assert len(reports) == 5 and "reports" not in after
    assert {t: len(rows) for t, rows in after.items() if t in before} == {
        t: len(rows) for t, rows in before.items()
    }
    for table, rows in before.items():
        for old, new in zip(rows, after[table], strict=True):
            for a, b in zip(old, new, strict=False):
                if isinstance(a, str) and len(a) == 20 and a.endswith("Z") and a[10] == "T":
                    # the same instant, in the fixed form
                    assert b == isoformat(parse_time(a)) and b is not None
                    assert datetime.strptime(b, TIME_FORMAT).replace(tzinfo=UTC) == parse_time(a)
                elif table == "machine_tokens" and isinstance(b, bytes):  # 0023: raw
                    assert b == bytes.fromhex(str(a))
                elif isinstance(a, str) and a.startswith('{"all_passed"'):  # 0021: compacted
                    assert b == health_to_stored(HealthResult.from_dict(json.loads(a)))
                else:
                    assert a == b, (table, old, new)


def test_a_migrated_database_reads_and_works(old_db: Path) -> None:
    store = Store(old_db)
    with store.read() as conn:
        fleet = machines.list_machines(conn)
        rid = store_rollouts.resolve(conn, "web-rollout")
        detail = store_rollouts.detail(conn, rid, datetime(2026, 11, 27, 11, tzinfo=UTC))
        listed = releases.list_releases(conn)
    assert detail.summary.status.value == "running" and len(detail.batches) == 2
    assert {m.id for m in fleet} == {"web-00", "web-01", "web-02", "web-03", "db-01", "gone-01"}
    assert len(listed) == 1
    with store.transaction() as conn:
        machines.set_tags(conn, "db-01", ["db", "new"], "operator", replace=True)
    with store.read() as conn:
        assert machines.get(conn, "db-01").tags == ("db", "new")
    store.close()


def test_the_reports_of_0007_become_the_changes_they_show(old_db: Path) -> None:
    """web-00's two reports show a switch; the other machines' single reports show nothing."""
    store = Store(old_db)
    with store.read() as conn:
        found = {m: history.latest(conn, m, 10) for m in ("web-00", "web-01", "web-02")}
    store.close()
    switch = found["web-00"]
    assert [(e.kind.value, e.source) for e in switch] == [("generation", "agent")]
    assert switch[0].previous is None  # the report before the first kept one is unknown
    assert switch[0].generation is not None and switch[0].generation.endswith("web-00")
    assert isoformat(switch[0].at) == "2026-11-27T10:00:30.000000Z"
    assert found["web-01"] == [] and found["web-02"] == []


ENUMERATED = [
    ("machines", "lifecycle", [v.value for v in Lifecycle]),
    ("machines", "system_state", [v.value for v in SystemState]),
    ("machines", "health", [v.value for v in Health]),
    ("rollouts", "status", [v.value for v in RolloutStatus]),
    ("rollout_batches", "status", [v.value for v in BatchStatus]),
    ("rollout_machines", "health", [v.value for v in MachineHealth]),
    ("rollout_files", "status", ["applied", "invalid"]),
    ("api_keys", "role", ["readonly", "deploy", "admin"]),
]


@pytest.mark.parametrize(("table", "column", "values"), ENUMERATED)
def test_every_enumerated_column_takes_exactly_its_values(
    old_db: Path, table: str, column: str, values: list[str]
) -> None:
    """Generated from the enums: each value is accepted, anything else refused."""
    Store(old_db).close()
    conn = sqlite3.connect(old_db, isolation_level=None)
    try:
        conn.execute("BEGIN")
        assert conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] > 0
        for value in values:
            conn.execute(f"UPDATE {table} SET {column} = ?", (value,))
        for bad in ("bogus", values[0].upper(), ""):
            with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
                conn.execute(f"UPDATE {table} SET {column} = ?", (bad,))
        conn.execute("ROLLBACK")
    finally:
        conn.close()


def test_machine_tags_reads_back_each_source_as_its_name(old_db: Path) -> None:
    """The view over machine_tag_rows (0022) and store.machines.TAG_SOURCES agree."""
    store = Store(old_db)
    with store.transaction() as conn:
        for source in machines.TAG_SOURCES:
            machines.set_tags(conn, "web-00", ["new"], source, replace=False)
        got = conn.execute("SELECT source FROM machine_tags WHERE tag = 'new' ORDER BY 1")
        assert [r[0] for r in got] == sorted(machines.TAG_SOURCES)
        for bad in (0, 3, "agent", None):
            with pytest.raises(sqlite3.IntegrityError):
                conn.execute(
                    "INSERT INTO machine_tag_rows VALUES ((SELECT num FROM machine_numbers "
                    "WHERE machine_id = 'web-00'), 'x', ?)",
                    (bad,),
                )
        assert machines.remove_tags(conn, "web-00", ["new", "absent"]) == ["new"]
        tags = conn.execute("SELECT tags_json FROM machines WHERE id = 'web-00'").fetchone()[0]
        assert "new" in json.loads(tags)  # still an agent tag
        machines.set_tags(conn, "web-00", [], "agent", replace=True)
        tags = conn.execute("SELECT tags_json FROM machines WHERE id = 'web-00'").fetchone()[0]
        assert "new" not in json.loads(tags)
    store.close()


@pytest.mark.parametrize(
    ("table", "column", "parent", "where"),
    [
        ("rollout_machines", "machine_id", "machines", "machine_id = 'web-00'"),
        ("rollout_files", "rollout_id", "rollouts", "path = '/srv/rollouts/web.yaml'"),
    ],
)
def test_the_added_foreign_keys_hold(
    old_db: Path, table: str, column: str, parent: str, where: str
) -> None:
    store = Store(old_db)
    with store.read() as conn:
        keys = {(r["from"], r["table"]) for r in conn.execute(f"PRAGMA foreign_key_list({table})")}
    assert (column, parent) in keys
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"), store.transaction() as conn:
        conn.execute(f"UPDATE {table} SET {column} = 'no-such-row' WHERE {where}")
    store.close()


# --- 0017: the compact history layout, on a database the 0013 code wrote ---------------


@pytest.fixture
def db_0013(tmp_path: Path) -> Path:
    target = tmp_path / "nixfleet.db"
    shutil.copyfile(FIXTURE_0013, target)
    return target


def test_the_0013_fixture_is_what_it_says(db_0013: Path) -> None:
    conn = sqlite3.connect(db_0013)
    names = [r[0] for r in conn.execute("SELECT name FROM schema_migrations ORDER BY name")]
    kinds = {r[0] for r in conn.execute("SELECT kind FROM machine_events")}
    conn.close()
    assert names[-1] == "0013_rollout_policy"
    assert kinds == {k.value for k in EventKind} - {"reboot-needed", "rebooted"}  # added later


def test_0017_carries_every_event_over_and_the_api_answers_as_before(db_0013: Path) -> None:
    """What the 0013 code's API rendered (schema-0013.history.json), field by field.

    Event ids were global then and count per machine now: only their order is kept.
    """
    rendered = json.loads(FIXTURE_0013.with_suffix(".history.json").read_text())
    store = Store(db_0013)
    with store.read() as conn:
        now = {m: [event_json(e) for e in history.latest(conn, m, 100)] for m in rendered}
    store.close()
    for machine, old in rendered.items():
        new = now[machine]
        assert [e["id"] for e in new] == list(range(1, len(old) + 1))
        assert [{**e, "id": 0} for e in new] == [{**e, "id": 0} for e in old], machine
        assert [list(e["detail"]) for e in new] == [list(e["detail"]) for e in old]


def test_a_0017_database_keeps_writing_and_pruning(db_0013: Path) -> None:
    store = Store(db_0013)
    with store.transaction() as conn:
        machines.register(conn, "new-01", [], Lifecycle.PENDING, datetime(2026, 11, 28, tzinfo=UTC))
        machines.set_desired(
            conn,
            "web-00",
            "/nix/store/" + "q" * 32 + "-x",
            None,
            "operator",
            datetime(2026, 11, 28, tzinfo=UTC),
        )
        machines.set_lifecycle(
            conn, "new-01", Lifecycle.ACTIVE, "key:admin", datetime(2026, 11, 28, 1, tzinfo=UTC)
        )
    with store.read() as conn:
        web = history.latest(conn, "web-00", 2)
        new = history.latest(conn, "new-01", 5)
    assert [(e.kind, e.previous, e.generation) for e in web][-1] == (
        EventKind.DESIRED,
        "/nix/store/" + "n" * 32 + "-nixos-system-web-00",
        "/nix/store/" + "q" * 32 + "-x",
    )
    assert [(e.id, e.kind, e.source) for e in new] == [(1, EventKind.LIFECYCLE, "key:admin")]
    with store.transaction() as conn:
        deleted, _ = history.prune(conn, datetime(2026, 11, 27, 10, 0, 30, tzinfo=UTC), 1000, 0, 10)
    assert deleted > 0
    store.close()


def test_event_kinds_are_the_kind_codes(db_0013: Path) -> None:
    """The stored kinds are exactly event_forms.KIND_CODES; any other code is refused."""
    store = Store(db_0013)
    with store.read() as conn:
        rows = dict(conn.execute("SELECT name, code FROM event_kinds").fetchall())
    assert rows == {k.value: c for k, c in event_forms.KIND_CODES.items()}
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"), store.transaction() as conn:
        conn.execute("UPDATE machine_events SET kind = ?", (max(rows.values()) + 1,))
    store.close()


# --- 0019: the tick's indexes, on a database the 0013 code wrote ----------------------


def test_0019_gives_the_tick_statements_their_indexes(db_0013: Path) -> None:
    """The policy tick's unavailable set and the batch tally search indexes, not tables.

    Without them each scans every machine or every row of the rollout per tick
    (docs/performance.md); a rewritten statement that lost its index fails here.
    """
    from nixfleet.store.policy import UNAVAILABLE_SQL

    store = Store(db_0013)
    with store.read() as conn:
        plans = {
            "unavailable": conn.execute(
                "EXPLAIN QUERY PLAN " + UNAVAILABLE_SQL, {"cutoff": "2026-01-01T00:00:00.000000Z"}
            ).fetchall(),
            "tally": conn.execute(
                "EXPLAIN QUERY PLAN SELECT count(*) FILTER (WHERE health = 'unhealthy'), "
                "count(*) FILTER (WHERE health = 'pending') FROM rollout_machines "
                "WHERE rollout_id = 'r' AND batch_idx = 0 AND health != 'healthy'"
            ).fetchall(),
        }
    store.close()
    steps = {name: [row[3] for row in plan] for name, plan in plans.items()}
    scans = [s for plan in steps.values() for s in plan if s.startswith("SCAN")]
    assert scans == ["SCAN reboot_leases"], steps  # the leases held now: a few rows
    used = " ".join(s for plan in steps.values() for s in plan)
    for index in ("machines_last_report", "machines_troubled", "rollout_machines_unsettled"):
        assert index in used, steps


def test_0020_stores_each_machines_health_as_health_of_says(db_0013: Path) -> None:
    """The backfill's SQL gives models.health_of of every machine's stored results."""
    old = sqlite3.connect(db_0013)
    with old:  # one machine failing its checks, as the 0013 code stored it
        old.execute(
            "UPDATE machines SET health_json = json_set(health_json, '$.all_passed', json('false')) "
            "WHERE id = (SELECT min(id) FROM machines WHERE health_json IS NOT NULL)"
        )
    old.close()
    store = Store(db_0013)
    with store.read() as conn:
        stored = dict(conn.execute("SELECT id, health FROM machines").fetchall())
        fleet = machines.list_machines(conn)
    store.close()
    assert {m.id: health_of(m.health).value for m in fleet} == stored
    assert set(stored.values()) == {h.value for h in Health}


def test_0021_stores_each_machines_health_as_health_to_stored_writes_it(db_0013: Path) -> None:
    """The SQL that compacts the stored results agrees with the Python codec, byte for byte."""
    old = sqlite3.connect(db_0013)
    with old:  # beside the fixture's own results: unicode, quotes, no checks, no duration
        first, second = (
            r[0]
            for r in old.execute(
                "SELECT id FROM machines WHERE health_json IS NOT NULL ORDER BY id LIMIT 2"
            )
        )
        tricky = {
            "all_passed": False,
            "results": [
                {"name": "disk", "kind": "command", "passed": False, "message": 'ünïcode "q"\n'},
                {"name": "web", "kind": "http", "passed": True, "duration_ms": 12, "message": ""},
            ],
        }
        old.execute("UPDATE machines SET health_json = ? WHERE id = ?", (json.dumps(tricky), first))
        old.execute(
            'UPDATE machines SET health_json = \'{"all_passed": true, "results": []}\' '
            "WHERE id = ?",
            (second,),
        )
        before = dict(old.execute("SELECT id, health_json FROM machines"))
    old.close()
    store = Store(db_0013)
    with store.read() as conn:
        after = dict(conn.execute("SELECT id, health_json FROM machines").fetchall())
    store.close()
    assert len([v for v in before.values() if v]) >= 3
    for machine, text in before.items():
        want = None if text is None else health_to_stored(HealthResult.from_dict(json.loads(text)))
        assert after[machine] == want, machine
        if text is not None:
            assert health_from_stored(after[machine]) == HealthResult.from_dict(json.loads(text))


def test_0023_keeps_every_token_working(tmp_path: Path) -> None:
    """A token issued before 0023 (its hash stored as hex) authenticates after it."""
    path = tmp_path / "fleet.db"
    with store_before(path, "0023") as old, old.transaction() as conn:
        machines.register(conn, "web-01", [], Lifecycle.ACTIVE, utcnow())
        conn.execute(  # what credentials.issue_token wrote before 0023
            "INSERT INTO machine_tokens VALUES ('web-01', ?, '2026-12-01T00:00:00.000000Z')",
            (hashlib.sha256(b"nft_old").hexdigest(),),
        )
    store = Store(path)
    with store.read() as conn:
        assert credentials.token_machine(conn, "nft_old") == "web-01"
        assert credentials.token_machine(conn, "nft_other") is None
        kind = conn.execute("SELECT typeof(token_hash) FROM machine_tokens").fetchone()[0]
    with store.transaction() as conn:  # a rotation replaces it, raw
        token = credentials.issue_token(conn, "web-01", utcnow())
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            conn.execute("UPDATE machine_tokens SET token_hash = 'ab'")
    with store.read() as conn:
        assert credentials.token_machine(conn, token) == "web-01"
        assert credentials.token_machine(conn, "nft_old") is None
    store.close()
    assert kind == "blob"


def test_0024_stores_paths_without_the_machines_name_and_reads_them_back(
    tmp_path: Path,
) -> None:
    """Events stored in the 0017 form read back the same after 0024, stored as
    event_forms.encode_path writes them today, and the machine_history view agrees."""
    path, h = tmp_path / "fleet.db", "/nix/store/" + "a" * 32
    paths = {
        "web-03.example.org": [
            f"{h}-nixos-system-web-03-24.11",
            f"{h}-nixos-system-web-04-24.11",
            f"{h}-nixos-system-web-03-odd\x02name",
            "/elsewhere/x",
            f"{h}-nixos-system-web-03-24.11",  # stored as a reference to the first
        ],
        "db-01": [f"{h}-nixos-system-db-01-nixos-system-db-01-1"],
    }
    with store_before(path, "0024") as old, old.transaction() as conn:
        for machine, mine in paths.items():
            machines.register(conn, machine, [], Lifecycle.ACTIVE, utcnow())
            num, seq = conn.execute(
                "SELECT n.num, coalesce(max(e.seq), 0) FROM machine_numbers n "
                "LEFT JOIN machine_events e ON e.machine = n.num WHERE n.machine_id = ?",
                (machine,),
            ).fetchone()
            for i, p in enumerate(mine):
                stored: object = p  # what 0017's encode_path wrote
                if p.startswith("/nix/store/"):
                    stored = p[len("/nix/store/") :].replace("-nixos-system-", "\x01")
                if i == 4:
                    stored = 4
                conn.execute(
                    "INSERT INTO machine_events (machine, seq, at, kind, source, generation) "
                    "VALUES (?, ?, ?, ?, 1, ?)",
                    (num, seq + 1 + i, 1_790_000_000_000_000 + i, 1, stored),
                )
    store = Store(path)
    with store.read() as conn:
        for machine, mine in paths.items():
            events = history.page(conn, machine, kinds=[EventKind.GENERATION]).events
            assert [e.generation for e in events] == mine
            view = conn.execute(
                "SELECT generation FROM machine_history WHERE machine_id = ? "
                "AND kind = 'generation' ORDER BY seq",
                (machine,),
            ).fetchall()
            assert [r[0] for r in view] == mine
            stored = conn.execute(
                "SELECT e.generation FROM machine_events e JOIN machine_numbers n "
                "ON n.num = e.machine WHERE n.machine_id = ? AND e.kind = 1 ORDER BY e.seq",
                (machine,),
            ).fetchall()
            want = [
                4 if i == 4 else event_forms.encode_path(p, machine) for i, p in enumerate(mine)
            ]
            assert [r[0] for r in stored] == want
    store.close()
    assert (
        event_forms.encode_path(paths["db-01"][0], "db-01") == "a" * 32 + "\x02nixos-system-db-01-1"
    )
