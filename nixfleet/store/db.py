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

Faults (DESIGN §9) end in StoreUnavailableError (503 + Retry-After), never in a
writer stuck inside a transaction: a failed COMMIT (disk full) is rolled back, or
the writer connection is replaced; waiting for the write lock is bounded
(`lock_timeout`), and after an outside process held it past that, writes fail at
once until the lock is free again (so waitress threads stay free for reads, which
never wait for it). The file's identity (device, inode) is checked before every
write: a database replaced or deleted under the process stops writes with a
clear error instead of writing to a file nobody will read. At open, an empty file
where a database is expected, a file that is not a database, and (with `check`)
a failed `PRAGMA quick_check` raise DatabaseFileError.

A commit that appended to `cache_changes` (what the report path's in-memory view,
nixfleet.api.report_cache, depends on) also publishes those rows in `<db>.changes`
(store.changes: memory-mapped by every process, written under the flock, after
COMMIT and before the caller answers), so a request knows without any SQLite call
whether its machine changed since its process last caught up.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import NoReturn

from nixfleet.errors import DatabaseFileError, StoreUnavailableError
from nixfleet.models import isoformat, utcnow
from nixfleet.store import changes
from nixfleet.store.migrations import MIGRATIONS

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 10_000
LOCK_TIMEOUT = 5.0  # seconds a write waits for the write lock before a 503
# SQLite result codes (primary) that mean "the database cannot take this write now".
UNAVAILABLE = {
    sqlite3.SQLITE_FULL: "the disk holding the database is full",
    sqlite3.SQLITE_BUSY: "another process holds the database's write lock",
    sqlite3.SQLITE_LOCKED: "the database is locked",
    sqlite3.SQLITE_READONLY: "the database file is read-only",
    sqlite3.SQLITE_IOERR: "an I/O error on the database file",
    sqlite3.SQLITE_CANTOPEN: "the database file cannot be opened",
    sqlite3.SQLITE_PERM: "no permission to write the database file",
}
# After a checkpoint has copied the whole WAL back, the next commit rewinds the WAL and
# truncates the file to this size, so one large transaction does not leave a large file.
# IS DISTINCT FROM (3.39), which the SQL shared with PostgreSQL uses; Debian 12 has 3.40.
MIN_SQLITE = (3, 39, 0)
WAL_SIZE_LIMIT = 8 * 1024 * 1024
# Less free space than this beside the database: /ready says the disk is full. A write
# that fits in the WAL's old frames can still commit then, so a write alone would
# answer ready or not by chance (whether a checkpoint just rewound the WAL).
FREE_FLOOR = 1024 * 1024


class Store:
    """Owns the database file; hands out per-thread connections and transactions.

    Write transactions all use ONE connection (under the write lock), and so do the
    hot path's small look-ups when the lock is free (`lookup`). In WAL mode a
    connection throws its page cache away whenever another connection has committed;
    with a connection per waitress thread, every report found every cache stale and
    re-read its B-tree pages through system calls (~65 µs for the token look-up
    alone). The writer's own commits keep its cache valid, so it stays warm.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        init: bool = False,
        check: bool = False,
        lock_timeout: float = LOCK_TIMEOUT,
    ) -> None:
        """Open (a missing file is created; an empty one only with `init`) and migrate."""
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise DatabaseFileError(
                f"this Python's SQLite is {sqlite3.sqlite_version}; nixfleet needs "
                f"{'.'.join(map(str, MIN_SQLITE))} or newer (run it from the Nix package)"
            )
        self.path = Path(path)
        self.lock_timeout = lock_timeout
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._write_lock = threading.RLock()  # re-entry fails in BEGIN, not deadlocks
        self._writer: sqlite3.Connection | None = None
        self._writer_busy_ms = -1
        self._busy_until = 0.0  # monotonic: an outside writer held the lock; fail fast
        self._lock_fd = -1  # `<db>.lock`, opened by the first write of this process
        self._signal = changes.ChangeSignal(Path(f"{self.path}.changes"))
        self._identity = (-1, -1)
        try:
            self._identity = self._prepare(init)
            if check:
                self.quick_check()
            self.migrate()
        except (sqlite3.DatabaseError, UnicodeDecodeError) as e:
            self.close()
            if isinstance(e, UnicodeDecodeError):
                # A corrupt schema can put bytes that are not UTF-8 into what SQLite
                # says of it ("malformed database schema (<its name>)"), which sqlite3
                # cannot decode.
                why = (
                    "it is corrupt: SQLite named the damage in bytes that are not UTF-8, "
                    f"{e.reason} at byte {e.start}"
                )
            elif (getattr(e, "sqlite_errorcode", None) or 0) & 0xFF in (
                sqlite3.SQLITE_NOTADB,
                sqlite3.SQLITE_CORRUPT,
            ):
                why = str(e)
            else:
                raise  # e.g. a migration's own error: not the file's fault
            raise DatabaseFileError(
                f"{self.path} is not a usable SQLite database ({why}); restore it from a "
                "backup (nixfleet-control-plane backup), or move it away to start anew"
            ) from e
        except BaseException:
            self.close()
            raise

    def _prepare(self, init: bool) -> tuple[int, int]:
        """Refuse an empty file where a database is expected; (device, inode) of the file."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        else:
            if st.st_size == 0 and not init:
                raise DatabaseFileError(
                    f"database file {self.path} is empty (0 bytes): a fleet's database was "
                    "expected there; restore it from a backup, or pass --init to start a "
                    "new, empty fleet in it"
                )
        # A connection of its own (closed again): one kept open across the migrations
        # would answer schema PRAGMAs from the schema it read before them.
        conn = self._open()  # creates the file when it is missing
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            with self._lock:
                self._all.remove(conn)
            conn.close()
        st = self.path.stat()
        return st.st_dev, st.st_ino

    def quick_check(self) -> None:
        """`PRAGMA quick_check`; DatabaseFileError naming the first problems it found."""
        rows = [str(r[0]) for r in self.connection().execute("PRAGMA quick_check(20)")]
        if rows != ["ok"]:
            raise DatabaseFileError(
                f"database {self.path} is corrupt (PRAGMA quick_check): "
                + "; ".join(rows[:5])
                + "; restore it from a backup (nixfleet-control-plane backup)"
            )

    def file_problem(self) -> str | None:
        """Why the file at `path` is no longer the database this process opened, if so."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return f"database file {self.path} was deleted while the control plane ran"
        except OSError as e:
            return f"database file {self.path} cannot be read: {e.strerror}"
        if (st.st_dev, st.st_ino) != self._identity:
            return f"database file {self.path} was replaced while the control plane ran"
        return None

    def _open(self) -> sqlite3.Connection:
        # Only the first connection may create the file (mode=rwc, when none exists):
        # a later one must not make a new empty database where one was deleted.
        mode = "rwc" if self._identity == (-1, -1) else "rw"
        problem = None if mode == "rwc" else self.file_problem()
        if problem is not None:
            raise StoreUnavailableError(f"{problem}; restart the control plane")
        conn = sqlite3.connect(
            f"file:{urllib.parse.quote(str(self.path))}?mode={mode}",
            uri=True,
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
        """A write transaction: all or nothing; StoreUnavailableError when it cannot be."""
        if not self._write_lock.acquire(timeout=self.lock_timeout):
            raise StoreUnavailableError(
                f"the database write lock was not free within {self.lock_timeout:g} s; retry later"
            )
        try:
            problem = self.file_problem()
            if problem is not None:
                log.error("%s; refusing writes (restart the control plane)", problem)
                raise StoreUnavailableError(f"{problem}; writes are refused until a restart")
            with self._process_lock():
                conn = self._begin()
                self._local.in_transaction = True
                try:
                    yield conn
                except BaseException as e:
                    self._rollback(conn)
                    if isinstance(e, sqlite3.Error):
                        _reraise(e)
                    raise
                finally:
                    self._local.in_transaction = False
                try:
                    pending = self._signal.pending(conn)
                    conn.execute("COMMIT")
                except sqlite3.Error as e:
                    # Disk full: the writer must not stay inside this transaction, or
                    # every later BEGIN fails ("cannot start a transaction within …").
                    self._rollback(conn)
                    _reraise(e)
                self._signal.publish(pending)  # still under the flock: in commit order
        finally:
            self._write_lock.release()

    def published_changes(self) -> int | None:
        """The last `cache_changes` row committed through a Store (store.changes)."""
        return self._signal.published()

    def changes_touch(self, applied: int, published: int, machine_id: str) -> bool:
        """Whether a published row after `applied` may concern the machine (store.changes)."""
        return self._signal.touches(applied, published, changes.key(machine_id))

    def _begin(self) -> sqlite3.Connection:
        conn = self._writer_connection()
        # After an outside writer held the lock for lock_timeout, do not wait again
        # until BEGIN succeeds: every thread waiting lock_timeout would starve reads.
        wait = 0 if time.monotonic() < self._busy_until else int(self.lock_timeout * 1000)
        if wait != self._writer_busy_ms:
            conn.execute(f"PRAGMA busy_timeout={wait}")
            self._writer_busy_ms = wait
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            if e.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                self._busy_until = time.monotonic() + self.lock_timeout
            if conn.in_transaction:
                self._rollback(conn)
            _reraise(e)
        self._busy_until = 0.0
        return conn

    def _rollback(self, conn: sqlite3.Connection) -> None:
        """Leave the transaction; a writer that cannot is replaced by a new one."""
        if not conn.in_transaction:
            return  # SQLite rolled back by itself (some I/O and disk-full errors)
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            log.exception("ROLLBACK failed; opening a new writer connection")
        if conn.in_transaction:
            with self._lock:
                if conn in self._all:
                    self._all.remove(conn)
            with suppress(sqlite3.Error):
                conn.close()
            if self._writer is conn:
                self._writer = None
                self._writer_busy_ms = -1

    def readiness(self) -> str | None:
        """None when the database takes writes and is migrated, else why not (for /ready).

        A real write: an empty transaction proves little (disk full shows at COMMIT),
        so it rewrites the header's user_version, which appends a page to the WAL.
        And the free space beside the file (FREE_FLOOR): that page may fit in old frames.
        """
        problem = self.file_problem() or self._space_problem()
        if problem is not None:
            return problem
        try:
            applied = set(self.applied_migrations())
        except sqlite3.Error as e:
            return f"cannot read the database: {e}"
        missing = [name for name, _ in MIGRATIONS if name not in applied]
        if missing:
            return f"migrations not applied: {', '.join(missing)}"
        try:
            with self.transaction() as conn:
                version = int(conn.execute("PRAGMA user_version").fetchone()[0])
                conn.execute(f"PRAGMA user_version={version}")
        except StoreUnavailableError as e:
            return e.detail
        return None

    def _space_problem(self) -> str | None:
        """The disk is full when less than FREE_FLOOR is left for an unprivileged writer."""
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return None  # file_problem names a directory that is gone
        free = st.f_bavail * st.f_frsize
        if st.f_blocks == 0 or free >= FREE_FLOOR:
            return None  # f_blocks 0: a file system that does not count its space
        return (
            f"{UNAVAILABLE[sqlite3.SQLITE_FULL]} ({free} bytes free in {self.path.parent}, "
            f"less than {FREE_FLOOR // 1024} KiB); free space there"
        )

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
            writer.create_function("nixfleet_unhex", 1, bytes.fromhex, deterministic=True)
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
        # Closing the last connection checkpoints too, when it can (never opening one:
        # a refused empty file stays empty).
        if self._all:
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
        self._signal.close()


def _reraise(e: sqlite3.Error) -> NoReturn:
    """StoreUnavailableError for the codes that say "not now"; other errors unchanged."""
    code = (getattr(e, "sqlite_errorcode", None) or 0) & 0xFF
    reason = UNAVAILABLE.get(code)
    if reason is None:
        raise e
    log.error("database write failed: %s (%s)", reason, e)
    raise StoreUnavailableError(f"{reason}; the write was not made, retry later") from e


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
