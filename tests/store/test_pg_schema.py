"""One schema, two spellings: every PostgreSQL table matches its SQLite twin.

The PostgreSQL migrations (store/sql/postgresql/) spell again what SQLite's
migrations built; this holds the two to the same tables, columns (name, order,
type family, NOT NULL, default) and indexes, so neither drifts (DESIGN rule 8).
"""

from __future__ import annotations

from pathlib import Path

from postgres_cluster import import_psycopg

from nixfleet.store import Store

import_psycopg()  # skip (a .venv without the extra) or fail (CI) before the import below
from nixfleet.store.pg import PgStore  # noqa: E402

PG_ONLY = {"leadership"}  # the replicas' fencing epoch: one SQLite process needs none
TYPES = {"TEXT": {"text"}, "INTEGER": {"integer", "bigint"}}


def pg_schema(store: PgStore) -> dict[str, list[tuple[str, str, bool, str | None]]]:
    with store.read() as conn:
        rows = conn.execute(
            "SELECT table_name, column_name, data_type, is_nullable, column_default, "
            "is_identity FROM information_schema.columns WHERE table_schema = 'public' "
            "ORDER BY table_name, ordinal_position"
        ).fetchall()
    out: dict[str, list[tuple[str, str, bool, str | None]]] = {}
    for r in rows:
        default = None if r["is_identity"] == "YES" else r["column_default"]
        if default is not None:
            default = default.split("::")[0]  # '{}'::text → '{}'
        out.setdefault(r["table_name"], []).append(
            (r["column_name"], r["data_type"], r["is_nullable"] == "NO", default)
        )
    return out


def pg_indexes(store: PgStore, table: str) -> set[str]:
    with store.read() as conn:
        rows = conn.execute(
            "SELECT i.relname AS name FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid "
            "JOIN pg_class t ON t.oid = x.indrelid WHERE t.relname = ? "
            "AND NOT x.indisprimary AND NOT x.indisunique",
            (table,),
        ).fetchall()
    return {r["name"] for r in rows}


def test_every_postgresql_table_is_its_sqlite_twin(postgres_url: str, tmp_path: Path) -> None:
    pg = PgStore(postgres_url, max_size=1)
    sqlite = Store(tmp_path / "nixfleet.db")
    try:
        tables = pg_schema(pg)
        assert {"api_keys", "audit", "schema_migrations"} <= set(tables)
        conn = sqlite.connection()
        for table, pg_columns in sorted(tables.items()):
            if table in PG_ONLY:
                continue
            info = conn.execute(f"PRAGMA table_info({table})").fetchall()
            assert info, f"{table}: no such table in SQLite"
            lite = [
                (r["name"], r["type"], bool(r["notnull"]) or bool(r["pk"]), r["dflt_value"])
                for r in info
            ]
            assert [c[0] for c in pg_columns] == [c[0] for c in lite], table
            for (name, pg_type, pg_notnull, pg_default), (
                _,
                lite_type,
                lite_notnull,
                lite_default,
            ) in zip(pg_columns, lite, strict=True):
                where = f"{table}.{name}"
                assert pg_type in TYPES[lite_type], f"{where}: {pg_type} vs {lite_type}"
                assert pg_notnull == lite_notnull, f"{where}: NOT NULL differs"
                assert pg_default == lite_default, (
                    f"{where}: default {pg_default} vs {lite_default}"
                )
            lite_indexes = {
                r["name"]
                for r in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ? "
                    "AND sql IS NOT NULL",
                    (table,),
                )
            }
            assert pg_indexes(pg, table) == lite_indexes, f"{table}: indexes differ"
    finally:
        pg.close()
        sqlite.close()
