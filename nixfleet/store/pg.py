"""The PostgreSQL store (psycopg 3 + psycopg_pool): the first slice of DESIGN §13.

`PgStore` offers the transactions of `store.db.Store` (one write transaction per
request, `read()` one snapshot, `lookup()` one autocommit query) over a connection
pool, and `PgConnection` makes a psycopg connection a `store.conn.Connection`, so
the noun modules' SQL (written with SQLite's `?` or `:name`) runs unchanged where
the dialects agree: each statement's `?` become `%s` and its `:name` `%(name)s` (a
literal `%` doubles; `::type` casts stay), outside string literals, quoted
identifiers and comments, translated once per statement text; rows are read by
column name and by position, as `sqlite3.Row`.

The schema is SQLite's, spelled again in `store/sql/postgresql/` (held to it by
tests/store/test_pg_schema.py); the replicas' leader lock and LISTEN/NOTIFY are in
store/leader.py and store/pg_notify.py. `published_changes()` and `changes_touch()`
(the report path's view, api.report_cache) come from one ChangeListener per store,
started at the first call, and from the NOTICEs of this store's own committed
changes (`cache_change` in 0004_baseline.sql), so a change is known here before the
transaction that made it returns, as on SQLite. Only some noun modules run here so far
(docs/scaling.md, "What is left"): nothing outside the tests opens a PgStore, and
settings refuse `postgresql://` until they all do.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib import resources
from typing import Any

import psycopg
from psycopg.rows import RowMaker
from psycopg_pool import ConnectionPool, PoolTimeout

from nixfleet.errors import DatabaseFileError, StoreUnavailableError
from nixfleet.models import isoformat, utcnow
from nixfleet.store import locks
from nixfleet.store.conn import Cursor
from nixfleet.store.pg_notify import CHANNEL, ChangeListener

log = logging.getLogger(__name__)

POOL_TIMEOUT = 5.0  # seconds a request waits for a pooled connection before a 503


def migrations() -> list[tuple[str, str]]:
    """(name, SQL) of `store/sql/postgresql/NNNN_name.sql`, in order."""
    folder = resources.files("nixfleet.store") / "sql" / "postgresql"
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".sql")), key=lambda f: f.name)
    return [(f.name.removesuffix(".sql"), f.read_text()) for f in files]


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@functools.lru_cache(maxsize=4096)
def translate(sql: str) -> str:
    """SQLite's `?` and `:name` placeholders as psycopg's `%s` and `%(name)s`.

    A literal `%` becomes `%%`; a `::type` cast is PostgreSQL's, not a parameter.
    Quoted text ('…', "…") and comments (-- …, /* … */) are copied as they are.
    """
    out: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c in "'\"":
            end = i + 1
            while end < n:
                if sql[end] == c:
                    if end + 1 < n and sql[end + 1] == c:  # '' or "" inside the quotes
                        end += 2
                        continue
                    break
                end += 1
            out.append(sql[i : end + 1].replace("%", "%%"))
            i = end + 1
        elif sql.startswith("--", i):
            end = sql.find("\n", i)
            end = n if end < 0 else end
            out.append(sql[i:end].replace("%", "%%"))
            i = end
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            end = n if end < 0 else end + 2
            out.append(sql[i:end].replace("%", "%%"))
            i = end
        elif c == "?":
            out.append("%s")
            i += 1
        elif c == ":":
            if sql.startswith("::", i):
                out.append("::")
                i += 2
                continue
            name = _NAME.match(sql, i + 1)
            if name is None:
                out.append(c)
                i += 1
            else:
                out.append(f"%({name.group()})s")
                i = name.end()
        elif c == "%":
            out.append("%%")
            i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


class Row(tuple[Any, ...]):
    """A result row read by position or by column name, like `sqlite3.Row`."""

    _index: dict[str, int] = {}

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return tuple.__getitem__(self, self._index[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._index)


@functools.lru_cache(maxsize=1024)
def _row_class(names: tuple[bytes, ...]) -> type[Row]:
    index = {name.decode(): i for i, name in enumerate(names)}  # the store's names are ASCII
    return type("Row", (Row,), {"_index": index})


def row_factory(cursor: psycopg.Cursor[Any]) -> RowMaker[Row]:
    """The row class of the cursor's result (its column names read from the result
    itself: `cursor.description` builds an object per column, ~50 µs a statement)."""
    res = cursor.pgresult
    if res is None:
        return _row_class(())
    return _row_class(tuple(res.fname(i) or b"" for i in range(res.nfields)))


class PgConnection:
    """A psycopg connection as a `store.conn.Connection`."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.raw = conn

    def execute(self, sql: str, parameters: Sequence[Any] | Mapping[str, Any] = (), /) -> Cursor:
        return self.raw.execute(translate(sql), _params(parameters))

    def executemany(
        self, sql: str, parameters: Iterable[Sequence[Any] | Mapping[str, Any]], /
    ) -> None:
        with self.raw.cursor() as cur:
            cur.executemany(translate(sql), [_params(p) for p in parameters])


def _params(parameters: Sequence[Any] | Mapping[str, Any]) -> Sequence[Any] | Mapping[str, Any]:
    return parameters if isinstance(parameters, Mapping) else tuple(parameters)


def _unavailable(e: Exception) -> StoreUnavailableError:
    if (getattr(e, "sqlstate", None) or "").startswith("40"):  # 40P01 deadlock, 40001
        # Two transactions waited for each other and the server aborted this one: it
        # wrote nothing, and the same request (the agent's next poll, the next tick)
        # succeeds on its own. A 503 with Retry-After, like SQLite's busy lock.
        log.warning("transaction aborted by the database, retry: %s", str(e).strip())
        return StoreUnavailableError(
            f"a concurrent transaction conflicted with this one ({str(e).strip()}); "
            "nothing was written, retry"
        )
    log.error("database unavailable: %s", e)
    return StoreUnavailableError(f"the database is unavailable ({e}); retry later")


class PgStore:
    """A PostgreSQL database; pooled connections; named migrations on open."""

    def __init__(self, conninfo: str, *, max_size: int = 8, timeout: float = POOL_TIMEOUT) -> None:
        self.timeout = timeout
        self.conninfo = conninfo
        # Per pooled connection, the changes its transaction wrote (cache_change's NOTICEs).
        self._notices: weakref.WeakKeyDictionary[psycopg.Connection[Any], list[str]] = (
            weakref.WeakKeyDictionary()
        )
        self._listener: ChangeListener | None = None
        self._listener_lock = threading.Lock()
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            conninfo,
            min_size=1,
            max_size=max_size,
            kwargs={"autocommit": True, "row_factory": row_factory},
            configure=self._configure,
            open=False,
            name="nixfleet",
        )
        try:
            try:
                self._pool.open(wait=True, timeout=timeout)
            except PoolTimeout as e:
                raise StoreUnavailableError(
                    f"cannot connect to the PostgreSQL database within {timeout:g} s; "
                    "check database_url and that the server runs"
                ) from e
            self.migrate()
        except BaseException:
            self._pool.close()
            raise

    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        """A new pooled connection: told of the changes it writes (cache_change)."""
        notices: list[str] = []
        prefix = CHANNEL + " "

        def heard(diag: psycopg.errors.Diagnostic) -> None:
            message = diag.message_primary
            if message is not None and message.startswith(prefix):
                notices.append(message[len(prefix) :])

        conn.add_notice_handler(heard)
        conn.execute(  # NOTICEs sent whatever the role's default
            "SELECT set_config('nixfleet.notice_changes', 'on', false), "
            "set_config('client_min_messages', 'notice', false)"
        )
        self._notices[conn] = notices

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        try:
            with self._pool.connection(timeout=self.timeout) as conn:
                notices = self._notices.get(conn)
                if notices:
                    notices.clear()  # a rolled-back transaction's, or autocommit writes'
                yield conn
        except PoolTimeout as e:
            raise _unavailable(e) from e
        except psycopg.OperationalError as e:
            raise _unavailable(e) from e

    @contextmanager
    def transaction(self) -> Iterator[PgConnection]:
        """A write transaction (READ COMMITTED): all or nothing."""
        with self._connection() as conn:
            with conn.transaction():
                yield PgConnection(conn)
            notices = self._notices.get(conn)
            if notices and self._listener is not None:
                self._listener.heard(notices)  # committed: known before the caller answers

    @contextmanager
    def read(self) -> Iterator[PgConnection]:
        """A read-only transaction on one snapshot (REPEATABLE READ)."""
        with self._connection() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            yield PgConnection(conn)

    @contextmanager
    def lookup(self) -> Iterator[PgConnection]:
        """A connection for one small autocommit read."""
        with self._connection() as conn:
            yield PgConnection(conn)

    def migrate(self) -> list[str]:
        """Apply pending migrations, each in its own transaction; return their names.

        An advisory lock held for each migration's transaction keeps two replicas
        starting at once from applying the same migration twice.
        """
        applied: list[str] = []
        with self._connection() as conn:
            with conn.transaction():  # IF NOT EXISTS alone races: a unique violation
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (locks.MIGRATION,))
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations "
                    "(name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)"
                )
            for name, sql in migrations():
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (locks.MIGRATION,))
                    done = conn.execute(
                        "SELECT 1 FROM schema_migrations WHERE name = %s", (name,)
                    ).fetchone()
                    if done:
                        continue
                    conn.execute(sql.encode())  # a script: no parameters, several statements
                    conn.execute(
                        "INSERT INTO schema_migrations (name, applied_at) VALUES (%s, %s)",
                        (name, isoformat(utcnow())),
                    )
                applied.append(name)
            known = {name for name, _ in migrations()}
            newer = [r[0] for r in conn.execute("SELECT name FROM schema_migrations ORDER BY name")]
            newer = [name for name in newer if name not in known]
        if newer:  # an older replica must not run on a schema it does not know
            raise DatabaseFileError(
                f"the PostgreSQL database was migrated by a newer nixfleet (migrations "
                f"{', '.join(newer)} are unknown to this one); run that version or a newer one"
            )
        return applied

    def applied_migrations(self) -> list[str]:
        with self.lookup() as conn:
            rows = conn.execute("SELECT name FROM schema_migrations ORDER BY name")
            return [r[0] for r in rows]

    def readiness(self) -> str | None:
        """None when the database takes writes and is migrated, else why not (for /ready)."""
        try:
            applied = set(self.applied_migrations())
            missing = [name for name, _ in migrations() if name not in applied]
            if missing:
                return f"migrations not applied: {', '.join(missing)}"
            with self.transaction() as conn:
                row = conn.execute("SELECT pg_is_in_recovery() AS standby").fetchone()
                if row is None or row["standby"]:
                    return "the database is a standby (read-only)"
                conn.execute(
                    "UPDATE schema_migrations SET applied_at = applied_at WHERE name = ?",
                    (max(applied),),
                )
        except StoreUnavailableError as e:
            return e.detail
        except psycopg.Error as e:
            return f"cannot use the database: {e}"
        return None

    def ping(self) -> None:
        with self.lookup() as conn:
            conn.execute("SELECT 1").fetchone()

    def _changes(self) -> ChangeListener:
        if self._listener is None:
            with self._listener_lock:
                if self._listener is None:
                    self._listener = ChangeListener(self.conninfo, last_change).start()
        return self._listener

    def published_changes(self) -> int | None:
        """The last `cache_changes` row committed (None until, or while not, listening)."""
        return self._changes().published()

    def changes_touch(self, applied: int, published: int, machine_id: str) -> bool:
        """Whether a change after `applied` may concern the machine (store.pg_notify)."""
        return self._changes().touches(applied, published, machine_id)

    def close(self) -> None:
        if self._listener is not None:
            self._listener.stop()
        self._pool.close()


def last_change(conn: psycopg.Connection[Any]) -> int:
    """The highest change committed (the listener's seed)."""
    row = conn.execute("SELECT coalesce(max(seq), 0) FROM cache_changes").fetchone()
    return 0 if row is None else int(row[0])
