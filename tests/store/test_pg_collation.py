"""Text compares as SQLite's BINARY on any PostgreSQL database, not only a C-collated one.

The test cluster is initialised without a locale (C), where a column without a
collation already sorts by byte; a database created with another locale (en-US, say)
sorts "web-10" after "web1" and "a" before "B". Every text column of the schema is
COLLATE "C" (test_pg_schema), so the store's order by id, tag or name is SQLite's on
such a database too: this runs the store on one and compares with SQLite.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from postgres_cluster import Server, import_psycopg

from nixfleet.models import Lifecycle
from nixfleet.store import Store, machines
from nixfleet.store.conn import AnyStore

import_psycopg()
import psycopg  # noqa: E402

from nixfleet.store.pg import PgStore  # noqa: E402

T0 = datetime(2026, 11, 27, 9, 0, tzinfo=UTC)
# Hostnames whose byte order is not a natural-language order: punctuation, digits, case.
IDS = ["web1", "web-10", "web-2", "web.example.org", "db_1", "db-1", "DB-2", "a", "B", "Zeta"]
TAGS = ["eu-west", "eu_west", "euWest", "EU", "eu", "prod-1", "prod10"]


def _collation(server: Server) -> str | None:
    """CREATE DATABASE options for a locale whose order is not C's, or None."""
    with psycopg.connect(server.url, autocommit=True) as conn:
        # pg_collation's ICU locale column is colliculocale before PostgreSQL 17,
        # colllocale after: read whichever the row has.
        rows = conn.execute(
            "SELECT c.collprovider::text, coalesce(to_jsonb(c) ->> 'colllocale', "
            "to_jsonb(c) ->> 'colliculocale'), c.collcollate, c.collctype FROM pg_collation c "
            "WHERE c.collencoding IN (-1, pg_char_to_encoding('UTF8')) "
            "ORDER BY c.collname IN ('en-US-x-icu', 'und-x-icu') DESC, c.collprovider = 'i' "
            "DESC, c.collname"
        ).fetchall()
        version = conn.info.server_version
    for provider, icu, collate, ctype in rows:
        if provider == "i" and icu and version >= 150000:
            return f"LOCALE_PROVIDER icu ICU_LOCALE '{icu}' LOCALE 'C'"
        if provider == "c" and collate and collate.split(".")[0] not in ("C", "POSIX"):
            return f"LC_COLLATE '{collate}' LC_CTYPE '{ctype}'"
    return None


@pytest.fixture
def foreign(postgres_server: Server) -> Iterator[str]:
    """The URL of a new database whose default collation is not C (dropped after)."""
    options = _collation(postgres_server)
    if options is None:
        pytest.skip("the server has no collation other than C and POSIX (nor ICU)")
    name = "nixfleet_test_" + secrets.token_hex(6)
    with psycopg.connect(postgres_server.url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0 ENCODING UTF8 {options}')
    url = postgres_server.database_url(name)
    try:
        yield url
    finally:
        postgres_server.drop_database(url)


def fill(store: AnyStore) -> None:
    with store.transaction() as conn:
        for i, machine_id in enumerate(IDS):
            machines.register(conn, machine_id, TAGS[: i % len(TAGS) + 1], Lifecycle.ACTIVE, T0)


def listing(store: AnyStore) -> tuple[list[str], list[tuple[str, tuple[str, ...]]], list[str]]:
    with store.read() as conn:
        ids = machines.machine_ids(conn)
        listed = [(m.id, m.operator_tags) for m in machines.list_machines(conn, ["eu"])]
        above = [r[0] for r in conn.execute("SELECT id FROM machines WHERE id > 'a' ORDER BY id")]
    return ids, listed, above


def test_the_store_orders_by_byte_on_a_database_of_another_collation(
    foreign: str, tmp_path: Path
) -> None:
    lite = Store(tmp_path / "nixfleet.db")
    pg = PgStore(foreign, max_size=2)
    try:
        fill(lite)
        fill(pg)
        with pg.read() as conn:
            # The database's own order is not SQLite's (else this test could not fail) …
            own = [
                r[0] for r in conn.execute('SELECT id FROM machines ORDER BY id COLLATE "default"')
            ]
        assert own != sorted(IDS, key=lambda s: s.encode())
        # … and the store's is.
        theirs = listing(lite)
        assert listing(pg) == theirs
        assert theirs[0] == sorted(IDS, key=lambda s: s.encode())
    finally:
        pg.close()
        lite.close()
