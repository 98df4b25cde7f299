"""One schema, two spellings: the PostgreSQL schema is SQLite's, object for object.

The PostgreSQL migrations (store/sql/postgresql/; 0001-0004 are the baseline) spell
again what SQLite's migrations built. These tests hold the two to each other, in both
directions, so that neither drifts (DESIGN rule 8):

- every table of one has its twin in the other (save PG_ONLY and SQLITE_ONLY), with
  the same columns (name, order, type family, NOT NULL, default; SPLIT names the one
  SQLite column that PostgreSQL spells as two), primary key, unique constraints,
  foreign keys (columns, target, ON DELETE/UPDATE), number of CHECK constraints and
  non-unique indexes (name, columns, partial or not);
- every text column is COLLATE "C" (SQLite's BINARY order);
- every view has its twin of the same name and columns;
- every trigger has its twin of the same name, on the same table, firing at the same
  time (AFTER) on the same event, for each row, with the same UPDATE OF columns.
  Triggers are compared by name because the names say what each one keeps, and
  PostgreSQL keeps them per table just as SQLite does;
- every SQLite migration after the one the baseline spells has a PostgreSQL file of
  the same name, and the other way round.

What a CHECK or a trigger does is held by behaviour: the same statements run on both
backends and must leave the same rows (trigger effects, the history view) or be
refused by both.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from postgres_cluster import import_psycopg

from nixfleet.models import TIME_FORMAT
from nixfleet.store import Store, event_forms
from nixfleet.store.conn import Connection
from nixfleet.store.migrations import MIGRATIONS

import_psycopg()  # skip (a .venv without the extra) or fail (CI) before the imports below
import psycopg  # noqa: E402

from nixfleet.store.pg import PgStore, migrations  # noqa: E402

PG_ONLY = {"leadership"}  # the replicas' fencing epoch: one SQLite process needs none
# cache_changes numbered again at commit (SQLite's single writer commits in seq order).
PG_ONLY_TRIGGERS = {"cache_changes_ordered"}
# SQLite's own bookkeeping of AUTOINCREMENT; PostgreSQL's identity sequences do that.
SQLITE_ONLY = {"sqlite_sequence"}
TYPES = {"TEXT": {"text"}, "INTEGER": {"smallint", "integer", "bigint"}, "BLOB": {"bytea"}}
# machine_events.generation is untyped in SQLite: an encoded path or a back-reference
# k; PostgreSQL spells it as a TEXT column and a SMALLINT one, with a CHECK on each
# (0004_baseline.sql says why). (table, SQLite column) -> [(PG column, type family)].
SPLIT = {("machine_events", "generation"): [("generation", "TEXT"), ("generation_back", "INTEGER")]}
PG_ONLY_CHECKS = {"machine_events": 2}  # generation_back > 0; at most one of the two set
# The PostgreSQL baseline spells SQLite's schema as of BASELINE_OF; each later SQLite
# migration ships a PostgreSQL file of the same name (docs/scaling.md).
BASELINE = [
    "0001_api_keys_audit",
    "0002_leadership",
    "0003_sessions_enroll_tokens",
    "0004_baseline",
]
BASELINE_OF = "0024_paths_without_host_names"
FK_ACTIONS = {
    "a": "NO ACTION",
    "r": "RESTRICT",
    "c": "CASCADE",
    "n": "SET NULL",
    "d": "SET DEFAULT",
}

Column = tuple[str, str, bool, str | None]  # name, type family, NOT NULL, default
ForeignKey = tuple[tuple[str, ...], str, tuple[str, ...], str, str]
Index = tuple[tuple[str, ...], bool]  # columns, partial
Trigger = tuple[str, str, str, tuple[str, ...]]  # table, timing, event, UPDATE OF columns


@dataclass
class Table:
    columns: list[Column]
    primary_key: tuple[str, ...]
    unique: set[tuple[str, ...]]
    foreign_keys: set[ForeignKey]
    checks: int
    indexes: dict[str, Index]


def family(pg_type: str) -> str:
    """The SQLite type whose PostgreSQL spellings include pg_type (else pg_type itself)."""
    return next((name for name, types in TYPES.items() if pg_type in types), pg_type)


# --- the SQLite side ---------------------------------------------------------------


def lite_names(conn: sqlite3.Connection, kind: str) -> set[str]:
    rows = conn.execute("SELECT name FROM sqlite_master WHERE type = ?", (kind,))
    return {r["name"] for r in rows}


def lite_table(conn: sqlite3.Connection, table: str) -> Table:
    info = conn.execute(f"PRAGMA table_info({table})").fetchall()
    columns: list[Column] = []
    for r in info:
        notnull = bool(r["notnull"]) or bool(r["pk"])
        for name, type_family in SPLIT.get((table, r["name"]), [(r["name"], r["type"])]):
            columns.append((name, type_family, notnull, r["dflt_value"]))
    pk = sorted((r["pk"], r["name"]) for r in info if r["pk"])
    unique: set[tuple[str, ...]] = set()
    indexes: dict[str, Index] = {}
    for ix in conn.execute(f"PRAGMA index_list({table})").fetchall():
        cols = tuple(r["name"] for r in conn.execute(f"PRAGMA index_info({ix['name']})"))
        if ix["origin"] == "u":
            unique.add(cols)
        elif ix["origin"] == "c" and not ix["unique"]:
            indexes[ix["name"]] = (cols, bool(ix["partial"]))
    keys: dict[int, list[Any]] = {}
    for r in conn.execute(f"PRAGMA foreign_key_list({table})"):
        keys.setdefault(r["id"], []).append(r)
    foreign_keys = {
        (
            tuple(r["from"] for r in rows),
            rows[0]["table"],
            tuple(r["to"] for r in rows),
            rows[0]["on_delete"],
            rows[0]["on_update"],
        )
        for rows in keys.values()
    }
    sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
    return Table(
        columns,
        tuple(name for _, name in pk),
        unique,
        foreign_keys,
        len(re.findall(r"\bCHECK\s*\(", sql, re.IGNORECASE)),
        indexes,
    )


TRIGGER_RE = re.compile(
    r"CREATE\s+TRIGGER\s+(\w+)\s+(BEFORE|AFTER|INSTEAD\s+OF)\s+(INSERT|DELETE|UPDATE)"
    r"(?:\s+OF\s+(.+?))?\s+ON\s+(\w+)",
    re.IGNORECASE | re.DOTALL,
)


def lite_triggers(conn: sqlite3.Connection) -> dict[str, Trigger]:
    out: dict[str, Trigger] = {}
    for r in conn.execute("SELECT sql FROM sqlite_master WHERE type = 'trigger'"):
        m = TRIGGER_RE.match(r["sql"])
        assert m, r["sql"]
        name, timing, event, columns, table = m.groups()
        of = tuple(sorted(c.strip() for c in columns.split(","))) if columns else ()
        out[name] = (table, timing.upper(), event.upper(), of)
    return out


# --- the PostgreSQL side -----------------------------------------------------------


def pg_relations(conn: Connection) -> dict[str, tuple[str, list[Column]]]:
    """Each table and view of the public schema: (table_type, its columns)."""
    rows = conn.execute(
        "SELECT c.table_name, t.table_type, c.column_name, c.data_type, c.is_nullable, "
        "c.column_default, c.is_identity FROM information_schema.columns c "
        "JOIN information_schema.tables t ON t.table_schema = c.table_schema "
        "AND t.table_name = c.table_name WHERE c.table_schema = 'public' "
        "ORDER BY c.table_name, c.ordinal_position"
    ).fetchall()
    out: dict[str, tuple[str, list[Column]]] = {}
    for r in rows:
        default = None if r["is_identity"] == "YES" else r["column_default"]
        if default is not None:
            default = default.split("::")[0]  # '{}'::text → '{}'
        out.setdefault(r["table_name"], (r["table_type"], []))[1].append(
            (r["column_name"], r["data_type"], r["is_nullable"] == "NO", default)
        )
    return out


def _attnames(keys: str, relation: str) -> str:
    """SQL: the names of the columns numbered `keys` (an int2 array) of `relation`."""
    return (
        f"ARRAY(SELECT a.attname::text FROM unnest({keys}) WITH ORDINALITY k (n, i) "
        f"JOIN pg_attribute a ON a.attrelid = {relation} AND a.attnum = k.n ORDER BY k.i)"
    )


def pg_table(conn: Connection, table: str, columns: list[Column]) -> Table:
    constraints = conn.execute(
        f"SELECT c.contype::text AS type, {_attnames('c.conkey', 'c.conrelid')} AS cols, "
        f"f.relname::text AS ref, {_attnames('c.confkey', 'c.confrelid')} AS ref_cols, "
        "c.confdeltype::text AS on_delete, c.confupdtype::text AS on_update "
        "FROM pg_constraint c LEFT JOIN pg_class f ON f.oid = c.confrelid "
        "WHERE c.conrelid = ?::regclass",
        (table,),
    ).fetchall()
    by_type: dict[str, list[Any]] = {}
    for c in constraints:
        by_type.setdefault(c["type"], []).append(c)
    indexes = conn.execute(
        f"SELECT i.relname AS name, {_attnames('x.indkey::int2[]', 'x.indrelid')} AS cols, "
        "x.indpred IS NOT NULL AS partial FROM pg_index x "
        "JOIN pg_class i ON i.oid = x.indexrelid "
        "WHERE x.indrelid = ?::regclass AND NOT x.indisprimary AND NOT x.indisunique",
        (table,),
    ).fetchall()
    (pk,) = by_type["p"]
    return Table(
        [(name, family(t), notnull, default) for name, t, notnull, default in columns],
        tuple(pk["cols"]),
        {tuple(c["cols"]) for c in by_type.get("u", [])},
        {
            (
                tuple(c["cols"]),
                c["ref"],
                tuple(c["ref_cols"]),
                FK_ACTIONS[c["on_delete"]],
                FK_ACTIONS[c["on_update"]],
            )
            for c in by_type.get("f", [])
        },
        len(by_type.get("c", [])) - PG_ONLY_CHECKS.get(table, 0),
        {r["name"]: (tuple(r["cols"]), r["partial"]) for r in indexes},
    )


def pg_triggers(conn: Connection) -> dict[str, Trigger]:
    rows = conn.execute(
        "SELECT t.trigger_name, t.event_object_table, t.action_timing, t.event_manipulation, "
        "t.action_orientation, (SELECT string_agg(u.event_object_column::text, ',') "
        "FROM information_schema.triggered_update_columns u "
        "WHERE u.trigger_name = t.trigger_name "
        "AND u.event_object_table = t.event_object_table) AS columns "
        "FROM information_schema.triggers t WHERE t.trigger_schema = 'public'"
    ).fetchall()
    out: dict[str, Trigger] = {}
    for r in rows:
        assert r["action_orientation"] == "ROW", r["trigger_name"]  # as every SQLite one
        of = tuple(sorted(r["columns"].split(","))) if r["columns"] else ()
        trigger = (r["event_object_table"], r["action_timing"], r["event_manipulation"], of)
        assert out.setdefault(r["trigger_name"], trigger) == trigger, r["trigger_name"]
    return out


# --- the comparisons ---------------------------------------------------------------


@pytest.fixture
def both(postgres_url: str, tmp_path: Path) -> Iterator[tuple[sqlite3.Connection, PgStore]]:
    """A new SQLite store's connection and a new PostgreSQL store, both migrated."""
    sqlite = Store(tmp_path / "nixfleet.db")
    pg = PgStore(postgres_url, max_size=1)
    try:
        yield sqlite.connection(), pg
    finally:
        pg.close()
        sqlite.close()


def test_every_table_has_its_twin(both: tuple[sqlite3.Connection, PgStore]) -> None:
    lite, pg = both
    with pg.read() as conn:
        relations = pg_relations(conn)
        tables = {name for name, (kind, _) in relations.items() if kind == "BASE TABLE"}
        assert tables - PG_ONLY == lite_names(lite, "table") - SQLITE_ONLY
        assert {"machines", "machine_events", "cache_changes", "schema_migrations"} <= tables
        for table in sorted(tables - PG_ONLY):
            theirs, ours = lite_table(lite, table), pg_table(conn, table, relations[table][1])
            assert [c[0] for c in ours.columns] == [c[0] for c in theirs.columns], table
            for mine, twin in zip(ours.columns, theirs.columns, strict=True):
                assert mine == twin, f"{table}.{mine[0]}: {mine} vs SQLite's {twin}"
            assert ours.primary_key == theirs.primary_key, f"{table}: primary key"
            assert ours.unique == theirs.unique, f"{table}: unique constraints"
            assert ours.foreign_keys == theirs.foreign_keys, f"{table}: foreign keys"
            assert ours.checks == theirs.checks, f"{table}: number of CHECK constraints"
            assert ours.indexes == theirs.indexes, f"{table}: indexes"


# store/pg.py creates schema_migrations itself (its names sort by their digits anyway).
UNCOLLATED = {("schema_migrations", "name"), ("schema_migrations", "applied_at")}


def test_every_text_column_compares_bytes_as_sqlite_does(
    both: tuple[sqlite3.Connection, PgStore],
) -> None:
    """SQLite compares TEXT byte by byte (BINARY); every text column here is COLLATE
    "C", the same order whatever the database's collation (test_pg_collation)."""
    _, pg = both
    with pg.read() as conn:
        rows = conn.execute(
            "SELECT c.table_name, c.column_name, c.collation_name "
            "FROM information_schema.columns c JOIN information_schema.tables t "
            "ON t.table_schema = c.table_schema AND t.table_name = c.table_name "
            "WHERE c.table_schema = 'public' AND t.table_type = 'BASE TABLE' "
            "AND c.data_type = 'text' ORDER BY c.table_name, c.ordinal_position"
        ).fetchall()
    columns = {(r[0], r[1]): r[2] for r in rows}
    assert ("machines", "id") in columns and set(columns) >= UNCOLLATED
    assert {k: v for k, v in columns.items() if v != "C" and k not in UNCOLLATED} == {}


def test_every_view_has_its_twin(both: tuple[sqlite3.Connection, PgStore]) -> None:
    lite, pg = both
    with pg.read() as conn:
        relations = pg_relations(conn)
    views = {name: cols for name, (kind, cols) in relations.items() if kind == "VIEW"}
    assert set(views) == lite_names(lite, "view") == {"machine_tags", "machine_history"}
    for view, columns in views.items():
        theirs = [r["name"] for r in lite.execute(f"PRAGMA table_info({view})")]
        assert [c[0] for c in columns] == theirs, view


def test_every_trigger_has_its_twin(both: tuple[sqlite3.Connection, PgStore]) -> None:
    lite, pg = both
    with pg.read() as conn:
        ours = pg_triggers(conn)
    theirs = lite_triggers(lite)
    assert set(ours) >= PG_ONLY_TRIGGERS
    ours = {k: v for k, v in ours.items() if k not in PG_ONLY_TRIGGERS}
    assert sorted(ours) == sorted(theirs)
    for name, trigger in ours.items():
        assert trigger == theirs[name], name


def test_every_migration_after_the_baseline_has_its_twin() -> None:
    lite = [name for name, _ in MIGRATIONS]
    ours = [name for name, _ in migrations()]
    assert BASELINE_OF in lite
    assert ours[: len(BASELINE)] == BASELINE
    assert ours[len(BASELINE) :] == lite[lite.index(BASELINE_OF) + 1 :]


# --- the same statements, the same rows ----------------------------------------------

T0, T1, T2 = (f"2024-05-01T10:00:0{s}.{s}00000Z" for s in (0, 1, 2))
WEB, DB = "web-1.example.com", "db-1"
NUM = "(SELECT num FROM machine_numbers WHERE machine_id = ?)"
ROLLOUT = (
    "INSERT INTO rollouts (id, name, release_id, status, document_json, document_hash, "
    "source, created_at, created_by, updated_at) VALUES (?, 'n', 'r1', 'running', '{}', 'h', "
    "'cli', ?, 'test', ?)"
)
# Each writes what a trigger watches (or, commented, what it must not react to).
SCRIPT: list[tuple[str, tuple[object, ...]]] = [
    ("INSERT INTO machines (id, lifecycle, registered_at) VALUES (?, 'active', ?)", (WEB, T0)),
    ("INSERT INTO machines (id, lifecycle, registered_at) VALUES (?, 'pending', ?)", (DB, T0)),
    *(
        (f"INSERT INTO machine_tag_rows (machine, tag, source) VALUES ({NUM}, ?, ?)", (WEB, t, s))
        for t, s in [("web", 1), ("B", 1), ("a", 2), ("web", 2)]
    ),
    (f"UPDATE machine_tag_rows SET machine = {NUM} WHERE source = 2 AND tag = 'web'", (DB,)),
    (f"UPDATE machine_tag_rows SET machine = {NUM} WHERE machine = {NUM}", (WEB, DB)),
    (f"INSERT INTO machine_tag_rows (machine, tag, source) VALUES ({NUM}, 'x', 1)", (WEB,)),
    ("DELETE FROM machine_tag_rows WHERE tag = 'x'", ()),
    ("UPDATE machines SET last_report_at = ? WHERE id = ?", (T1, WEB)),  # not cached
    ("UPDATE machines SET system_state = 'ok' WHERE id = ?", (WEB,)),
    ("UPDATE machines SET system_state = 'ok' WHERE id = ?", (WEB,)),  # no change
    (
        "INSERT INTO machine_tokens (machine_id, token_hash, created_at) VALUES (?, ?, ?)",
        (WEB, bytes(32), T0),
    ),
    ("UPDATE machine_tokens SET token_hash = ?", (bytes(range(32)),)),
    ("UPDATE machine_tokens SET machine_id = ?", (DB,)),
    ("DELETE FROM machine_tokens", ()),
    ("INSERT INTO releases (id, created_at, created_by) VALUES ('r1', ?, 'test')", (T0,)),
    (ROLLOUT, ("ro1", T0, T0)),
    (ROLLOUT, ("ro2", T1, T1)),
    ("UPDATE rollouts SET updated_at = ? WHERE id = 'ro1'", (T2,)),  # not cached
    ("UPDATE rollouts SET status = 'paused' WHERE id = 'ro1'", ()),
    ("UPDATE rollouts SET status = 'completed', poll_hint = 5 WHERE id = 'ro2'", ()),
    *(
        (
            "INSERT INTO rollout_machines (rollout_id, machine_id, batch_idx, position, "
            "store_path) VALUES (?, ?, 0, 1, '/nix/store/p')",
            (r, WEB),
        )
        for r in ("ro1", "ro2")
    ),
    (
        "UPDATE machines SET failed_generation = '/nix/store/bad', last_message = 'boom', "
        "last_report_at = ? WHERE id = ?",
        (T2, WEB),
    ),
    ("UPDATE machines SET failed_generation = '/nix/store/bad' WHERE id = ?", (WEB,)),
    (
        "UPDATE machines SET needs_reboot = 1, booted_generation = '/nix/store/old', "
        "current_generation = '/nix/store/new' WHERE id = ?",
        (WEB,),
    ),
    ("UPDATE machines SET needs_reboot = 1 WHERE id = ?", (WEB,)),  # already needed
    ("UPDATE machines SET failed_generation = '/nix/store/x' WHERE id = ?", (DB,)),  # no time
    ("UPDATE machines SET failed_generation = NULL WHERE id = ?", (WEB,)),
    (f"INSERT INTO machine_tag_rows (machine, tag, source) VALUES ({NUM}, 'db', 1)", (DB,)),
    ("DELETE FROM machines WHERE id = ?", (DB,)),  # its number and tags go with it
]


def trigger_effects(conn: Connection) -> dict[str, list[tuple[Any, ...]]]:
    def rows(sql: str) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in conn.execute(sql).fetchall()]

    outbox = []
    for event, at, rollout, machine, detail in rows(
        "SELECT event, at, rollout_id, machine_id, detail_json FROM webhook_outbox ORDER BY id"
    ):
        when = at
        if machine == DB:  # no report time: the statement's (a TIME_FORMAT text of now)
            stored = datetime.strptime(at, TIME_FORMAT).replace(tzinfo=UTC)
            assert abs(stored - datetime.now(UTC)) < timedelta(minutes=5), at
            when = "now"
        outbox.append((event, when, rollout, machine, json.loads(detail)))
    return {
        "numbers": rows("SELECT num, machine_id FROM machine_numbers ORDER BY num"),
        "tags_json": rows("SELECT id, tags_json FROM machines ORDER BY id"),
        "machine_tags": sorted(rows("SELECT machine_id, tag, source FROM machine_tags")),
        "cache_changes": rows(
            "SELECT seq, kind, machine_id, rollout_id, lo, hi FROM cache_changes ORDER BY seq"
        ),
        "outbox": outbox,
    }


def test_the_triggers_write_what_sqlites_write(
    both: tuple[sqlite3.Connection, PgStore],
) -> None:
    lite, pg = both
    for sql, params in SCRIPT:
        lite.execute(sql, params)
    with pg.lookup() as conn:  # autocommit: each statement on its own, as on SQLite
        for sql, params in SCRIPT:
            conn.execute(sql, params)
        ours = trigger_effects(conn)
    assert ours == trigger_effects(lite)
    # What that is (SQLite's triggers have their own tests; these are the PL/pgSQL's):
    assert ours["numbers"] == [(1, WEB)]
    assert ours["tags_json"] == [(WEB, '["B","a","web"]')]  # byte order, as SQLite's
    assert ours["machine_tags"] == [
        (WEB, "B", "agent"),
        (WEB, "a", "operator"),
        (WEB, "web", "agent"),
        (WEB, "web", "operator"),
    ]
    changes = [
        (kind, machine or rollout) for _, kind, machine, rollout, _, _ in ours["cache_changes"]
    ]
    assert changes == [
        *[("machine", WEB)] * 3,  # tags web, B, a (the operator's web changes nothing)
        *[("machine", DB)] * 2,  # that web moved to db-1 and back (the old row's machine)
        *[("machine", WEB)] * 2,  # x added, x removed
        ("machine", WEB),  # system_state
        *[("machine", WEB)] * 3,  # token added; changed (its old and new holder)
        ("machine", WEB),  # token moved: its old holder …
        *[("machine", DB)] * 2,  # … and its new one; removed
        ("rollout", "ro1"),
        ("members", "ro1"),
        ("rollout", "ro2"),
        ("members", "ro2"),
        ("rollout", "ro1"),  # paused
        ("rollout", "ro2"),  # completed
        *[("machine", WEB)] * 2,  # failed; reboot needed
        ("machine", DB),  # failed
        ("machine", WEB),  # failure cleared
        ("machine", DB),  # tag db (then nothing for its deletion)
    ]
    assert [(e[0], e[2]) for e in ours["outbox"]] == [
        ("machine.failed", "ro1"),  # the paused rollout, not the completed one
        ("machine.reboot-needed", "ro1"),
        ("machine.failed", None),
    ]
    assert ours["outbox"][0][4] == {
        "generation": "/nix/store/bad",
        "current_generation": None,
        "message": "boom",
    }


def test_machine_history_reads_as_on_sqlite(both: tuple[sqlite3.Connection, PgStore]) -> None:
    lite, pg = both
    p1 = "/nix/store/" + "a" * 32 + "-nixos-system-web-1-24.05.1"
    p2 = "/nix/store/" + "b" * 32 + "-nixos-system-other-24.05.2"
    start = event_forms.micros(datetime(2024, 5, 1, 10, tzinfo=UTC))
    # (kind, source, generation: a path, a back-reference k or None, detail)
    events: list[tuple[int, int, str | int | None, str | None]] = [
        (0, 2, event_forms.encode_path(p1, WEB), None),
        (1, 1, 1, None),
        (2, 1, None, '["healthy","unknown",[],[],[]]'),
        (0, 3, event_forms.encode_path(p2, WEB), None),
        (3, 1, 1, '["boom"]'),
        (1, 1, "/weird/path", None),  # not a store path: kept whole
        (4, 1, 6, '["rolled back"]'),
    ]
    new_source = "INSERT INTO event_sources (name) VALUES ('rollout:canary')"
    lite.execute(
        "INSERT INTO machines (id, lifecycle, registered_at) VALUES (?, 'active', ?)", (WEB, T0)
    )
    lite.execute(new_source)
    with pg.lookup() as conn:
        conn.execute(
            "INSERT INTO machines (id, lifecycle, registered_at) VALUES (?, 'active', ?)", (WEB, T0)
        )
        conn.execute(new_source)
        for seq, (kind, source, generation, detail) in enumerate(events, 1):
            at = start + seq * 1_234_567
            lite.execute(
                "INSERT INTO machine_events (machine, seq, at, kind, source, generation, detail) "
                "VALUES (1, ?, ?, ?, ?, ?, ?)",
                (seq, at, kind, source, generation, detail),
            )
            path, back = (None, generation) if isinstance(generation, int) else (generation, None)
            conn.execute(
                "INSERT INTO machine_events (machine, seq, at, kind, source, generation, "
                "generation_back, detail) VALUES (1, ?, ?, ?, ?, ?, ?, ?)",
                (seq, at, kind, source, path, back, detail),
            )
        query = "SELECT * FROM machine_history ORDER BY seq"
        ours = [tuple(r) for r in conn.execute(query).fetchall()]
    assert ours == [tuple(r) for r in lite.execute(query).fetchall()]
    assert [(r[4], r[5]) for r in ours] == [
        ("operator", p1),
        ("agent", p1),
        ("agent", None),
        ("rollout:canary", p2),
        ("agent", p2),
        ("agent", "/weird/path"),
        ("agent", p1),
    ]
    assert ours[0][2] == "2024-05-01T10:00:01.234567Z"


SETUP: list[tuple[str, tuple[object, ...]]] = [
    ("INSERT INTO machines (id, lifecycle, registered_at) VALUES ('m', 'active', ?)", (T0,)),
    ("INSERT INTO releases (id, created_at, created_by) VALUES ('r1', ?, 'test')", (T0,)),
]
REFUSED: list[tuple[str, tuple[object, ...]]] = [
    ("INSERT INTO machines (id, lifecycle, registered_at) VALUES ('x', 'gone', ?)", (T0,)),
    ("UPDATE machines SET system_state = 'fine'", ()),
    ("UPDATE machines SET last_success = 2", ()),
    ("UPDATE machines SET health = 'meh'", ()),
    ("INSERT INTO machine_numbers (machine_id) VALUES ('m')", ()),  # numbered already
    ("INSERT INTO machine_numbers (machine_id) VALUES ('nobody')", ()),
    (
        "INSERT INTO machine_tokens (machine_id, token_hash, created_at) VALUES ('m', ?, ?)",
        (bytes(31), T0),
    ),
    ("INSERT INTO machine_tag_rows (machine, tag, source) VALUES (1, 't', 3)", ()),
    ("INSERT INTO machine_tag_rows (machine, tag, source) VALUES (99, 't', 1)", ()),
    ("INSERT INTO machine_events (machine, seq, at, kind, source) VALUES (1, 1, 0, 99, 1)", ()),
    ("INSERT INTO machine_events (machine, seq, at, kind, source) VALUES (1, 1, 0, 0, 99)", ()),
    (ROLLOUT.replace("'r1'", "'r9'"), ("ro1", T0, T0)),
    (ROLLOUT.replace("'running'", "'done'"), ("ro1", T0, T0)),
    ("INSERT INTO cache_changes (kind) VALUES ('everything')", ()),
    ("INSERT INTO api_keys VALUES ('k', 'root', 'h', ?, 'test', NULL)", (T0,)),
]


def test_both_refuse_the_same_rows(both: tuple[sqlite3.Connection, PgStore]) -> None:
    lite, pg = both
    with pg.lookup() as conn:
        for sql, params in SETUP:
            lite.execute(sql, params)
            conn.execute(sql, params)
        for sql, params in REFUSED:
            with pytest.raises(sqlite3.IntegrityError):
                lite.execute(sql, params)
            with pytest.raises(psycopg.IntegrityError):
                conn.execute(sql, params)


def test_advisory_lock_keys_are_distinct_and_the_sql_takes_store_locks() -> None:
    """Two nouns on one key would wait for each other; the baseline spells CHANGES itself."""
    from nixfleet.store import locks

    assert len(set(locks.ALL.values())) == len(locks.ALL)
    assert all(key >> 16 == 0x6E66 for key in locks.ALL.values())
    names = {k for k in vars(locks) if k.isupper() and k != "ALL"}
    assert names == set(locks.ALL)
    baseline = "\n".join(sql for _, sql in migrations())
    taken = {int(n) for n in re.findall(r"pg_advisory_xact_lock\((\d+)\)", baseline)}
    assert taken == {locks.CHANGES}
