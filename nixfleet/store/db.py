"""Connection setup, transactions and named migrations.

One connection per thread (sqlite3 connections must not be shared across threads),
WAL so readers never block the single writer, and `BEGIN IMMEDIATE` so a write
transaction takes the write lock up front instead of failing half-way with
SQLITE_BUSY on upgrade.

Writers queue on a Python lock, then on an flock of `<db>.lock`, before BEGIN
IMMEDIATE. SQLite's busy handler waits by sleeping and polling (1, 2, 5, 10 … 100 ms),
so eight waitress threads racing for the write lock used to spend their time asleep
(p99 report latency ~60 ms, a third of the throughput), and so did the control
plane's worker processes (p99 56 ms). A blocked lock is handed over at once: the
thread lock within a process, the flock between processes (control-plane workers,
the host-side `keys create`, `backup`). busy_timeout still covers any other writer.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from nixfleet.models import isoformat, utcnow
from nixfleet.store.migrations import MIGRATIONS

BUSY_TIMEOUT_MS = 10_000
# After a checkpoint has copied the whole WAL back, the next commit rewinds the WAL and
# truncates the file to this size, so one large transaction does not leave a large file.
WAL_SIZE_LIMIT = 8 * 1024 * 1024


class Store:
    """Owns the database file; hands out per-thread connections and transactions.

    Write transactions all use ONE connection (under the write lock), and so do the
    hot path's small look-ups when the lock is free (`lookup`). In WAL mode a
    connection throws its page cache away whenever another connection has committed;
    with a connection per waitress thread, every report found every cache stale and
    re-read its B-tree pages through system calls (~65 µs for the token look-up
    alone). The writer's own commits keep its cache valid, so it stays warm.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._write_lock = threading.RLock()  # re-entry fails in BEGIN, not deadlocks
        self._writer: sqlite3.Connection | None = None
        self._lock_fd = -1  # `<db>.lock`, opened by the first write of this process
        self.migrate()

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path,
            isolation_level=None,
            check_same_thread=False,
            timeout=BUSY_TIMEOUT_MS / 1000,
        )
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL is durable across process crashes in WAL mode (only an OS crash can
        # lose the last transactions), which is what "kill -9 at any point" needs.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA cache_size=-65536")
        conn.execute("PRAGMA temp_store=MEMORY")
        with self._lock:
            self._all.append(conn)
        return conn

    def connection(self) -> sqlite3.Connection:
        """This thread's connection (the writer's, inside this thread's transaction)."""
        if getattr(self._local, "in_transaction", False):
            assert self._writer is not None
            return self._writer
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._open()
        return conn

    def _writer_connection(self) -> sqlite3.Connection:
        if self._writer is None:
            writer = self._open()
            # No automatic checkpoint inside COMMIT: it made the commit that crossed
            # 1,000 WAL pages (a report, or a tick moving a 100,000-machine batch)
            # copy the whole WAL into the database file first (~110 ms at 100,000
            # rows). `checkpoint` does it instead, from the background job after
            # each tick and when the store closes. Durability does not depend on
            # checkpoints: a committed transaction is in the WAL, which survives
            # kill -9 and is replayed by the next connection.
            writer.execute("PRAGMA wal_autocheckpoint=0")
            writer.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            self._writer = writer
        return self._writer

    @contextmanager
    def _process_lock(self) -> Iterator[None]:
        if self._lock_fd < 0:
            self._lock_fd = os.open(
                f"{self.path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: all or nothing."""
        with self._write_lock, self._process_lock():
            conn = self._writer_connection()
            conn.execute("BEGIN IMMEDIATE")
            self._local.in_transaction = True
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            finally:
                self._local.in_transaction = False
            conn.execute("COMMIT")

    @contextmanager
    def lookup(self) -> Iterator[sqlite3.Connection]:
        """A connection for one small autocommit read: the warm writer's when it is free."""
        if self._write_lock.acquire(blocking=False):
            try:
                yield self._writer_connection()
            finally:
                self._write_lock.release()
        else:
            yield self.connection()

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: one consistent snapshot for a multi-query read."""
        conn = self.connection()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    def migrate(self) -> list[str]:
        """Apply pending migrations, each in its own transaction; return their names."""
        applied: list[str] = []
        with self.transaction() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)"
            )
            done = {r[0] for r in conn.execute("SELECT name FROM schema_migrations")}
        pending = [(name, sql) for name, sql in MIGRATIONS if name not in done]
        if not pending:
            return applied
        # A migration may rebuild a table (0009), which needs foreign keys off; SQLite
        # honours that only outside a transaction. Each migration checks every foreign
        # key before it commits instead.
        with self._write_lock:
            writer = self._writer_connection()
            writer.execute("PRAGMA foreign_keys=OFF")
            try:
                for name, sql in pending:
                    with self.transaction() as conn:
                        for statement in _statements(sql):
                            conn.execute(statement)
                        broken = conn.execute("PRAGMA foreign_key_check").fetchall()
                        if broken:
                            raise sqlite3.IntegrityError(
                                f"migration {name}: {len(broken)} row(s) break a foreign key, "
                                f"e.g. in table {broken[0][0]}"
                            )
                        conn.execute(
                            "INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)",
                            (name, isoformat(utcnow())),
                        )
                    applied.append(name)
            finally:
                writer.execute("PRAGMA foreign_keys=ON")
        return applied

    def applied_migrations(self) -> list[str]:
        rows = self.connection().execute("SELECT name FROM schema_migrations ORDER BY name")
        return [r[0] for r in rows]

    def checkpoint(self) -> tuple[int, int]:
        """Copy the WAL back into the database file without blocking anyone.

        PASSIVE: runs on this thread's own connection, beside the writer and the
        readers, and copies what no open read transaction still needs; frames it
        leaves are copied next time. Once everything is copied, the next commit
        starts the WAL over (and truncates it to WAL_SIZE_LIMIT), which keeps it
        bounded. Returns (frames in the WAL, frames copied).
        """
        row = self.connection().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return int(row[1]), int(row[2])

    def ping(self) -> None:
        """Liveness: the database answers a query."""
        self.connection().execute("SELECT 1").fetchone()

    def backup(self, target: Path) -> None:
        """A transactionally consistent, compacted copy (VACUUM INTO), safe while serving."""
        self.connection().execute("VACUUM INTO ?", (str(target),))

    def close(self) -> None:
        # Closing the last connection checkpoints too, when it can.
        with suppress(sqlite3.Error):
            self.checkpoint()
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()
        self._writer = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def _statements(sql: str) -> list[str]:
    """Split a migration script; executescript would commit our transaction.

    Pieces between ';' are joined until SQLite calls them a complete statement,
    so a trigger's `BEGIN …; …; END` stays one statement.
    """
    out: list[str] = []
    buf = ""
    for piece in sql.split(";"):
        buf += piece + ";"
        if sqlite3.complete_statement(buf):
            statement = buf.strip().rstrip(";").strip()
            if statement:
                out.append(statement)
            buf = ""
    if buf.strip(" \n;"):
        raise ValueError(f"incomplete statement in a migration: {buf.strip()[:80]}")
    return out
