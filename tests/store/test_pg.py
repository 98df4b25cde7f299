"""The PostgreSQL store's own parts: placeholders, rows, migrations, faults."""

from __future__ import annotations

import threading

import pytest
from ports import free_port
from postgres_cluster import Cluster, bin_dir, import_psycopg, unavailable

from nixfleet.errors import DatabaseFileError, StoreUnavailableError

import_psycopg()  # skip (a .venv without the extra) or fail (CI) before the imports below
import psycopg  # noqa: E402

from nixfleet.store import pg  # noqa: E402


@pytest.mark.parametrize(
    ("sqlite", "postgresql"),
    [
        ("SELECT 1", "SELECT 1"),
        (
            "SELECT * FROM t WHERE a = ? AND b IN (?, ?)",
            "SELECT * FROM t WHERE a = %s AND b IN (%s, %s)",
        ),
        ("SELECT '?', 'it''s ?' WHERE x = ?", "SELECT '?', 'it''s ?' WHERE x = %s"),
        ('SELECT "odd?name" FROM t WHERE y = ?', 'SELECT "odd?name" FROM t WHERE y = %s'),
        (
            "SELECT a % 2 FROM t WHERE n LIKE 'a%' AND m = ?",
            "SELECT a %% 2 FROM t WHERE n LIKE 'a%%' AND m = %s",
        ),
        ("SELECT ? -- why?\n, ?", "SELECT %s -- why?\n, %s"),
        ("SELECT /* what? */ ?", "SELECT /* what? */ %s"),
        (
            "UPDATE t SET a = :a, b = :b_2 WHERE id = :a",
            "UPDATE t SET a = %(a)s, b = %(b_2)s WHERE id = %(a)s",
        ),
        ("SELECT :x::text, a[1:2], ':y' -- :z", "SELECT %(x)s::text, a[1:2], ':y' -- :z"),
    ],
)
def test_placeholders_are_translated_outside_quotes_and_comments(
    sqlite: str, postgresql: str
) -> None:
    assert pg.translate(sqlite) == postgresql


def test_translated_sql_runs_and_rows_read_by_name_and_position(postgres_url: str) -> None:
    store = pg.PgStore(postgres_url, max_size=2)
    try:
        with store.transaction() as conn:
            conn.execute(
                "INSERT INTO api_keys (name, role, key_hash, created_at, created_by) "
                "VALUES (?, 'admin', ?, '2026-12-02T12:00:00.000000Z', 'test')",
                ("a%b", "h1"),
            )
            row = conn.execute(
                "SELECT name, role AS r, '?' AS q FROM api_keys "
                "WHERE name LIKE 'a%' AND key_hash = ?",
                ("h1",),
            ).fetchone()
        assert row is not None
        assert (row["name"], row["r"], row["q"]) == ("a%b", "admin", "?")
        assert (row[0], row[1]) == ("a%b", "admin")
        name, role, q = row
        assert (name, role, q) == ("a%b", "admin", "?")
        assert row.keys() == ["name", "r", "q"]
        assert dict(zip(row.keys(), row, strict=True)) == {"name": "a%b", "r": "admin", "q": "?"}
        with pytest.raises(KeyError):
            row["missing"]
        with store.transaction() as conn:
            conn.executemany(
                "UPDATE api_keys SET role = :role WHERE key_hash = :hash AND :hash <> ''",
                [{"role": "deploy", "hash": "h1"}],
            )
            row = conn.execute(
                "SELECT role, CAST(:n AS TEXT)::int + 1 AS n FROM api_keys WHERE name = :name",
                {"name": "a%b", "n": "41"},
            ).fetchone()
        assert row is not None
        assert (row["role"], row["n"]) == ("deploy", 42)
    finally:
        store.close()


def test_replicas_starting_at_once_apply_each_migration_once(postgres_url: str) -> None:
    stores: list[pg.PgStore] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            stores.append(pg.PgStore(postgres_url, max_size=1))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    try:
        assert errors == []
        assert len(stores) == 3
        names = [name for name, _ in pg.migrations()]
        assert stores[0].applied_migrations() == names
        with stores[0].read() as conn:
            rows = conn.execute("SELECT count(*) AS n FROM schema_migrations").fetchone()
        assert rows["n"] == len(names)
    finally:
        for s in stores:
            s.close()


def test_a_lost_connection_is_a_503_once_then_replaced(postgres_url: str) -> None:
    store = pg.PgStore(postgres_url, max_size=1)
    try:
        with store.lookup() as conn:
            pid = conn.execute("SELECT pg_backend_pid() AS pid").fetchone()["pid"]
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(StoreUnavailableError), store.transaction() as conn:
            conn.execute("SELECT 1")
        with store.transaction() as conn:
            assert conn.execute("SELECT 1 AS one").fetchone()["one"] == 1
        assert store.readiness() is None
    finally:
        store.close()


def test_an_unreachable_server_is_a_clear_error() -> None:
    url = f"postgresql://nixfleet@127.0.0.1:{free_port()}/nixfleet?connect_timeout=1"
    with pytest.raises(StoreUnavailableError, match="cannot connect to the PostgreSQL database"):
        pg.PgStore(url, timeout=1.0)


def test_readiness_says_when_the_server_is_gone() -> None:
    """/ready reflects the database: a server that stopped is a reason, not a hang."""
    found = bin_dir()
    if found is None:
        unavailable("no PostgreSQL binaries (Debian: apt-get install postgresql)")
    assert found is not None
    cluster = Cluster(found)
    try:
        server = cluster.start()
        store = pg.PgStore(server.url + "?connect_timeout=2", max_size=2, timeout=1.0)
        assert store.readiness() is None
        cluster.stop()
        reason = store.readiness()
        assert reason is not None and "unavailable" in reason
        with pytest.raises(StoreUnavailableError):
            store.ping()
        store.close()
    finally:
        cluster.stop()


def test_a_deadlock_is_a_retryable_503_that_wrote_nothing(postgres_url: str) -> None:
    """Two transactions that wait for each other: the server aborts one, which becomes
    StoreUnavailableError (503, Retry-After) with nothing of it committed."""
    store = pg.PgStore(postgres_url, max_size=2)
    try:
        with store.transaction() as conn:
            for name in ("a", "b"):
                conn.execute(
                    "INSERT INTO api_keys (name, role, key_hash, created_at, created_by) "
                    "VALUES (?, 'admin', ?, '2026-12-02T12:00:00.000000Z', 'test')",
                    (name, f"h-{name}"),
                )
        both = threading.Barrier(2)
        outcomes: dict[str, BaseException | None] = {}

        def lock(first: str, second: str) -> None:
            try:
                with store.transaction() as conn:
                    conn.execute("UPDATE api_keys SET role = 'deploy' WHERE name = ?", (first,))
                    both.wait(timeout=10)
                    conn.execute("UPDATE api_keys SET role = 'deploy' WHERE name = ?", (second,))
                outcomes[first] = None
            except BaseException as e:
                outcomes[first] = e

        threads = [threading.Thread(target=lock, args=pair) for pair in (("a", "b"), ("b", "a"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        failed = [e for e in outcomes.values() if e is not None]
        assert len(outcomes) == 2 and len(failed) == 1, outcomes
        assert isinstance(failed[0], StoreUnavailableError)
        assert "conflicted" in str(failed[0]) and "nothing was written" in str(failed[0])
        with store.read() as conn:
            roles = dict(conn.execute("SELECT name, role FROM api_keys").fetchall())
        loser = next(k for k, v in outcomes.items() if v is not None)
        winner = "b" if loser == "a" else "a"
        assert roles == {"a": "deploy", "b": "deploy"}  # the winner wrote both rows
        assert outcomes[winner] is None
    finally:
        store.close()


def test_a_database_migrated_by_a_newer_version_is_refused(postgres_url: str) -> None:
    """As a replica of the old version would meet it during an upgrade: it says so and
    opens nothing, rather than running on a schema it does not know."""
    pg.PgStore(postgres_url, max_size=1).close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO schema_migrations (name, applied_at) "
            "VALUES ('9999_from_the_future', '2027-01-01T00:00:00.000000Z')"
        )
    with pytest.raises(DatabaseFileError) as e:
        pg.PgStore(postgres_url, max_size=1)
    assert "newer nixfleet" in str(e.value) and "9999_from_the_future" in str(e.value)
