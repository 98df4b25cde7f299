"""Copy an SQLite database into a new PostgreSQL one (`nixfleet-control-plane migrate-db`).

docs/scaling.md "Operations": the SQLite file is read, read-only, in one snapshot;
it must be at exactly this code's schema (every name of store.migrations.MIGRATIONS
applied, none unknown). The target is migrated (PgStore does so on open) and must be
empty: no row anywhere but what its own migrations seed (SEEDED). Then every table
is copied in one PostgreSQL transaction, parents first (by pg_catalog's foreign keys),
with COPY, rows streamed from the SQLite cursor (bounded memory); the foreign keys
are checked once each after the copy, the identity sequences set past the copied ids,
the row counts of both compared, and only then does it commit. A failure anywhere
leaves the target as it was; refusals come before any write.

The tables and columns are read from both catalogs, not listed here, so a table or
column added by a migration is copied too, and one without a twin on the other side
is an error, not a silent gap. What the two schemas spell differently (0004_baseline.sql)
is CONVERTED (SQLite's untyped machine_events.generation is PostgreSQL's generation
and generation_back) or adapted by psycopg (BLOB → BYTEA). The tables' own triggers
are off during the copy: the rows already hold what they would write (machine
numbers, tags_json, cache_changes rows). SQLite's own tables have no twin: sqlite_stat*
(PostgreSQL ANALYZEs after the copy) and sqlite_sequence (its AUTOINCREMENT marks move
the sequences). The report cache's cache_changes rows are copied like any other.
"""

from __future__ import annotations

import graphlib
import sqlite3
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from nixfleet.errors import ConflictError, DatabaseFileError, ServiceError, StoreUnavailableError
from nixfleet.store.migrations import MIGRATIONS
from nixfleet.store.pg import PgStore

# Each backend's own record of its migrations (PostgreSQL's baseline has its own names).
BOOKKEEPING = "schema_migrations"
# The replicas' fencing epoch: one SQLite process needs none (tests/store/test_pg_schema).
PG_ONLY = frozenset({"leadership"})
# The rows PostgreSQL's migrations seed (0002 leadership, 0004 the event kinds and the
# first two sources), as SQL conditions: a target holding only these is empty. A twin
# table's seeded rows are replaced by SQLite's (which has the same, migrated alike).
SEEDED = {
    "leadership": "id = 1 AND epoch = 0 AND holder IS NULL AND acquired_at IS NULL",
    "event_kinds": "true",  # fixed codes, written by migrations only
    "event_sources": "id IN (1, 2)",
}
# PostgreSQL columns read from SQLite through an expression instead of by their name.
CONVERTED = {
    ("machine_events", "generation"): (
        "CASE WHEN typeof(generation) = 'integer' THEN NULL ELSE generation END"
    ),
    ("machine_events", "generation_back"): (
        "CASE WHEN typeof(generation) = 'integer' THEN generation END"
    ),
}
LOCK_TIMEOUT = "10s"  # a target in use (a control plane on it) is refused, not waited for
CONNECT_TIMEOUT = 10


@dataclass(frozen=True)
class Table:
    """One table to copy: PostgreSQL's columns and the SQLite query that yields them."""

    name: str
    columns: tuple[str, ...]
    select: str
    serials: tuple[str, ...]  # identity (or serial) columns, whose sequences follow the ids


@dataclass(frozen=True)
class Copied:
    table: str
    rows: int
    seconds: float


def migrate(source: Path, target: str) -> list[Copied]:
    """Copy the SQLite database at `source` into the PostgreSQL database `target` (a
    libpq URI without password); the tables copied, in the order they were."""
    src = open_source(source)
    try:
        with _connect(target) as pg:
            PgStore(target, max_size=1).close()  # migrates a new one; refuses a newer one
            try:
                with pg.transaction():
                    copied = _copy_all(src, pg, target)
            except psycopg.errors.InsufficientPrivilege as e:
                raise ServiceError(
                    f"{target}: {str(e).strip()}; run migrate-db as the role that owns the "
                    "database's tables (the control plane's); nothing was written"
                ) from e
            except psycopg.OperationalError as e:
                raise StoreUnavailableError(
                    f"{target} went away during the copy ({str(e).strip()}); nothing was "
                    "written: run migrate-db again"
                ) from e
            pg.execute("ANALYZE")  # the planner's statistics of what was just written
    finally:
        src.close()
    return copied


def open_source(path: Path) -> sqlite3.Connection:
    """`path` opened read-only inside one read transaction (every later read sees one
    snapshot), refused unless its schema is exactly this code's."""
    where = f"sqlite:{path}"
    if not path.is_file():
        raise DatabaseFileError(
            f"{where}: no such file; --from names the control plane's SQLite database"
        )
    uri = f"file:{urllib.parse.quote(str(path))}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None)
    try:
        conn.execute("BEGIN")  # the snapshot begins at the first read, below
        applied = {r[0] for r in conn.execute(f"SELECT name FROM {BOOKKEEPING}")}
    except sqlite3.DatabaseError as e:
        conn.close()
        raise DatabaseFileError(
            f"{where} is not a nixfleet database ({e}); a control plane's database is "
            "migrated when the control plane starts on it"
        ) from e
    known = [name for name, _ in MIGRATIONS]
    newer = sorted(applied - set(known))
    missing = [name for name in known if name not in applied]
    if newer:
        conn.close()
        raise DatabaseFileError(
            f"{where} was migrated by a newer nixfleet (migrations {', '.join(newer)} are "
            "unknown here); run migrate-db of that version or a newer one"
        )
    if missing:
        conn.close()
        raise DatabaseFileError(
            f"{where} is not fully migrated (missing {', '.join(missing)}); start this "
            "version's control plane on it once (it migrates at start), stop it, then run "
            "migrate-db again"
        )
    return conn


@contextmanager
def _connect(target: str) -> Iterator[psycopg.Connection[Any]]:
    """One connection to the target, libpq's own words when there is none."""
    try:
        conn = psycopg.connect(target, autocommit=True, connect_timeout=CONNECT_TIMEOUT)
    except psycopg.OperationalError as e:
        raise StoreUnavailableError(f"cannot connect to {target}: {str(e).strip()}") from e
    with conn:
        yield conn


def _copy_all(src: sqlite3.Connection, pg: psycopg.Connection[Any], target: str) -> list[Copied]:
    """Inside the target's transaction: lock, check, copy, set sequences, verify."""
    pg.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
    tables = plan(src, pg)
    names = [t.name for t in tables]
    locked = [*names, *(n for n in sorted(PG_ONLY) if _exists(pg, n))]
    try:
        pg.execute(
            sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(
                sql.SQL(", ").join(map(sql.Identifier, locked))
            )
        )
    except psycopg.errors.LockNotAvailable as e:
        raise ConflictError(
            f"{target} is in use (a table stayed locked for {LOCK_TIMEOUT}): stop what "
            "uses it (a control plane?) and run migrate-db again"
        ) from e
    _refuse_unless_empty(pg, locked, target)
    for name in names:
        if name in SEEDED:  # SQLite's own seeded rows come with the copy
            pg.execute(sql.SQL("DELETE FROM {}").format(sql.Identifier(name)))
        pg.execute(sql.SQL("ALTER TABLE {} DISABLE TRIGGER USER").format(sql.Identifier(name)))
    keys = _drop_foreign_keys(pg, names)
    copied = [_copy(src, pg, t) for t in tables]
    _add_foreign_keys(pg, keys)
    _set_sequences(src, pg, tables)
    wrong = []
    for t, c in zip(tables, copied, strict=True):
        want = src.execute(f'SELECT count(*) FROM "{t.name}"').fetchone()[0]
        got = _count(pg, t.name)
        if not want == got == c.rows:
            wrong.append(f"{t.name} (SQLite {want}, sent {c.rows}, PostgreSQL {got})")
    if wrong:
        raise ServiceError(
            f"the row counts differ after the copy: {', '.join(wrong)}; nothing was written"
        )
    for name in names:
        pg.execute(sql.SQL("ALTER TABLE {} ENABLE TRIGGER USER").format(sql.Identifier(name)))
    return copied


def _exists(pg: psycopg.Connection[Any], table: str) -> bool:
    row = pg.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()
    return bool(row and row[0])


def _count(pg: psycopg.Connection[Any], table: str, where: str = "") -> int:
    query = sql.SQL("SELECT count(*) FROM {} ").format(sql.Identifier(table)) + sql.SQL(where)
    row = pg.execute(query).fetchone()
    assert row is not None
    return int(row[0])


def _refuse_unless_empty(pg: psycopg.Connection[Any], tables: list[str], target: str) -> None:
    found = []
    for name in tables:
        seeded = SEEDED.get(name)
        n = _count(pg, name, f"WHERE NOT ({seeded})" if seeded else "")
        if n:
            found.append(f"{name} ({n})")
    if found:
        raise ConflictError(
            f"{target} is not empty: rows in {', '.join(found)} beyond what its migrations "
            "write; migrate-db copies only into a new, empty database (createdb one and name "
            "it in --to)"
        )


def plan(src: sqlite3.Connection, pg: psycopg.Connection[Any]) -> list[Table]:
    """Every table to copy, parents first; a DatabaseFileError naming each table or
    column of one schema that has no twin in the other."""
    rows = pg.execute(
        "SELECT c.table_name, c.column_name, c.is_identity = 'YES' "
        "OR coalesce(c.column_default, '') LIKE 'nextval(%' "
        "FROM information_schema.columns c JOIN information_schema.tables t "
        "ON t.table_schema = c.table_schema AND t.table_name = c.table_name "
        "WHERE c.table_schema = current_schema() AND t.table_type = 'BASE TABLE' "
        "ORDER BY c.table_name, c.ordinal_position"
    ).fetchall()
    pg_columns: dict[str, list[tuple[str, bool]]] = {}
    for table, column, serial in rows:
        if table != BOOKKEEPING and table not in PG_ONLY:
            pg_columns.setdefault(table, []).append((column, bool(serial)))
    lite_tables = {
        r[0]
        for r in src.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        if not r[0].startswith("sqlite_") and r[0] != BOOKKEEPING  # SQLite's own: no twin
    }
    problems = [
        f"PostgreSQL's table {t} has none in SQLite"
        for t in sorted(pg_columns.keys() - lite_tables)
    ]
    problems += [
        f"SQLite's table {t} has none in PostgreSQL"
        for t in sorted(lite_tables - pg_columns.keys())
    ]
    tables: dict[str, Table] = {}
    for name in sorted(pg_columns.keys() & lite_tables):
        lite = [r[1] for r in src.execute(f'PRAGMA table_info("{name}")')]
        columns = [c for c, _ in pg_columns[name]]
        problems += [
            f"SQLite's column {name}.{c} has none in PostgreSQL" for c in lite if c not in columns
        ]
        exprs = []
        for c in columns:
            if (name, c) in CONVERTED:
                exprs.append(CONVERTED[name, c])
            elif c in lite:
                exprs.append(f'"{c}"')
            else:
                problems.append(f"PostgreSQL's column {name}.{c} has none in SQLite")
        tables[name] = Table(
            name,
            tuple(columns),
            f'SELECT {", ".join(exprs)} FROM "{name}"',
            tuple(c for c, serial in pg_columns[name] if serial),
        )
    if problems:
        raise DatabaseFileError(
            "the SQLite and PostgreSQL schemas differ, so migrate-db would lose data: "
            + "; ".join(problems)
            + " (a table or column outside nixfleet's migrations, or a migration without "
            "its twin: report it as a bug)"
        )
    return [tables[name] for name in _parents_first(pg, sorted(tables))]


def _parents_first(pg: psycopg.Connection[Any], names: list[str]) -> list[str]:
    """`names` ordered so that each table comes after those its foreign keys reference."""
    order: graphlib.TopologicalSorter[str] = graphlib.TopologicalSorter()
    for name in names:
        order.add(name)
    for child, parent in pg.execute(
        "SELECT ch.relname::text, pa.relname::text FROM pg_constraint c "
        "JOIN pg_class ch ON ch.oid = c.conrelid JOIN pg_class pa ON pa.oid = c.confrelid "
        "JOIN pg_namespace n ON n.oid = ch.relnamespace "
        "WHERE c.contype = 'f' AND n.nspname = current_schema()"
    ):
        if child != parent and child in names and parent in names:
            order.add(child, parent)
    return list(order.static_order())


ForeignKey = tuple[str, str, str]  # table, constraint name, definition


def _drop_foreign_keys(pg: psycopg.Connection[Any], names: list[str]) -> list[ForeignKey]:
    """The foreign keys among `names`, dropped (in this transaction) until the copy is
    done: checked per row they cost tens of µs a row each (machine_events has three);
    added back, each is checked in one join, as pg_restore does."""
    keys: list[ForeignKey] = [
        (r[0], r[1], r[2])
        for r in pg.execute(
            "SELECT t.relname::text, c.conname::text, pg_get_constraintdef(c.oid) "
            "FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid "
            "JOIN pg_namespace n ON n.oid = t.relnamespace "
            "WHERE c.contype = 'f' AND n.nspname = current_schema() ORDER BY 1, 2"
        )
        if r[0] in names
    ]
    for table, name, _ in keys:
        pg.execute(
            sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                sql.Identifier(table), sql.Identifier(name)
            )
        )
    return keys


def _add_foreign_keys(pg: psycopg.Connection[Any], keys: list[ForeignKey]) -> None:
    for table, name, definition in keys:
        try:
            pg.execute(
                sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                    sql.Identifier(table), sql.Identifier(name), sql.SQL(definition)
                )
            )
        except psycopg.errors.ForeignKeyViolation as e:
            raise ServiceError(
                f"the SQLite database breaks foreign key {name} of {table}: "
                f"{str(e).strip()}; nothing was written"
            ) from e


def _copy(src: sqlite3.Connection, pg: psycopg.Connection[Any], table: Table) -> Copied:
    started = time.monotonic()
    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(table.name), sql.SQL(", ").join(map(sql.Identifier, table.columns))
    )
    n = 0
    try:
        with pg.cursor() as cur, cur.copy(statement) as copy:
            for row in src.execute(table.select):  # one row at a time: bounded memory
                copy.write_row(row)
                n += 1
    except psycopg.Error as e:
        raise ServiceError(
            f"copying table {table.name} failed: {str(e).strip()}; nothing was written"
        ) from e
    return Copied(table.name, n, time.monotonic() - started)


def _set_sequences(
    src: sqlite3.Connection, pg: psycopg.Connection[Any], tables: list[Table]
) -> None:
    """Each identity sequence past the highest id copied, and past SQLite's
    AUTOINCREMENT high-water mark (sqlite_sequence), so that no id is handed out twice."""
    try:
        marks = dict(src.execute("SELECT name, seq FROM sqlite_sequence").fetchall())
    except sqlite3.OperationalError:  # no AUTOINCREMENT table in the file
        marks = {}
    for t in tables:
        for column in t.serials:
            row = pg.execute(
                sql.SQL("SELECT max({}) FROM {}").format(
                    sql.Identifier(column), sql.Identifier(t.name)
                )
            ).fetchone()
            highest = max(
                (int(v) for v in (row[0] if row else None, marks.get(t.name)) if v is not None),
                default=0,
            )
            if highest > 0:  # else the sequence's own start (1) is right; setval refuses 0
                pg.execute(
                    "SELECT setval(pg_get_serial_sequence(quote_ident(%s), %s), %s)",
                    (t.name, column, highest),
                )
