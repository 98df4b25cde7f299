"""Which replica runs the background jobs: a session advisory lock + a fencing epoch.

docs/scaling.md "Several replicas: one leader". `Leadership` holds a connection of
its own (never one of the pool's, never through a transaction-mode pooler: the lock
belongs to that server session) with TCP keepalives, so the server notices a leader
whose host vanished within seconds; kill -9 closes the socket and frees the lock at
once. Taking the lock increments `leadership.epoch`; `check_epoch`, the first
statement of every background transaction, reads the epoch FOR SHARE and raises
NotLeaderError when it is not the caller's, before anything is written. The row
lock makes the hand-over exact: the next leader's increment waits for a transaction
of the old one in flight, and every later one of the old leader aborts.

Only PostgreSQL has replicas; a single SQLite process is always its own leader.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from typing import Any

import psycopg

from nixfleet.errors import NotLeaderError
from nixfleet.models import isoformat, utcnow
from nixfleet.store import locks
from nixfleet.store.conn import AnyStore, Connection

log = logging.getLogger(__name__)

# TCP keepalives on the leader's connection, set on both ends: a vanished peer is
# noticed after about idle + interval x count seconds, inside DESIGN §8's 10 s.
KEEPALIVE = {"idle": 2, "interval": 1, "count": 3}  # seconds, seconds, probes


class Leadership:
    """One replica's claim: `try_acquire()` → its epoch or None; `held()`; `release()`."""

    def __init__(self, conninfo: str, holder: str) -> None:
        self.conninfo = conninfo
        self.holder = holder
        self.epoch: int | None = None
        self._conn: psycopg.Connection[Any] | None = None

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(
                self.conninfo,
                autocommit=True,
                application_name=f"nixfleet-leader {self.holder}"[:63],
                connect_timeout=5,
                keepalives=1,
                keepalives_idle=KEEPALIVE["idle"],
                keepalives_interval=KEEPALIVE["interval"],
                keepalives_count=KEEPALIVE["count"],
            )
            # The server's side too: it holds the lock, and frees it when its backend
            # finds the peer gone (these settings are per session).
            for name, value in KEEPALIVE.items():
                self._conn.execute(f"SET tcp_keepalives_{name} = {value:d}")
        return self._conn

    def try_acquire(self) -> int | None:
        """Take the lock if it is free and return the new epoch; None while another holds it."""
        if self.held():
            return self.epoch
        try:
            conn = self._connection()
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (locks.LEADER,)).fetchone()
            if row is None or not row[0]:
                return None
            # Waits for a background transaction of the previous leader still in flight.
            got = conn.execute(
                "UPDATE leadership SET epoch = epoch + 1, holder = %s, acquired_at = %s "
                "WHERE id = 1 RETURNING epoch",
                (self.holder, isoformat(utcnow())),
            ).fetchone()
        except psycopg.OperationalError as e:
            log.warning("leader election: database unavailable (%s)", e)
            self._drop()
            return None
        assert got is not None, "migration 0002_leadership inserts the row"
        self.epoch = int(got[0])
        log.info("%s is the leader (epoch %d)", self.holder, self.epoch)
        return self.epoch

    def held(self) -> bool:
        """Whether this replica still holds the lock (a round trip on its connection)."""
        if self.epoch is None or self._conn is None or self._conn.closed:
            return False
        try:
            self._conn.execute("SELECT 1").fetchone()
        except psycopg.Error as e:  # the connection is dropped below, and the lock with it
            log.error("%s lost the leader's lock (epoch %d): %s", self.holder, self.epoch, e)
            self._drop()
            return False
        return True

    def _drop(self) -> None:
        self.epoch = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def release(self) -> None:
        """Give the lock up (a clean shutdown); the next leader takes it at once."""
        if self._conn is not None and not self._conn.closed and self.epoch is not None:
            # An error: the session is gone, and the lock with it.
            with suppress(psycopg.OperationalError):
                self._conn.execute("SELECT pg_advisory_unlock(%s)", (locks.LEADER,))
        self._drop()


def check_epoch(conn: Connection, epoch: int | None) -> None:
    """First statement of a background transaction: NotLeaderError unless `epoch` leads."""
    row = conn.execute("SELECT epoch FROM leadership WHERE id = 1 FOR SHARE").fetchone()
    current = None if row is None else int(row[0])
    if epoch is None or current != epoch:
        raise NotLeaderError(
            f"this replica is not the leader (its epoch {epoch}, the database's {current}); "
            "the background transaction wrote nothing"
        )


class Fenced:
    """The store as the leader's background jobs see it: each write transaction starts
    with `check_epoch`, so a replica that lost the lock writes nothing (NotLeaderError)."""

    def __init__(self, store: AnyStore, leadership: Leadership) -> None:
        self.store = store
        self.leadership = leadership

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        with self.store.transaction() as conn:
            check_epoch(conn, self.leadership.epoch)
            yield conn

    def read(self) -> AbstractContextManager[Connection]:
        return self.store.read()

    def lookup(self) -> AbstractContextManager[Connection]:
        return self.store.lookup()

    def migrate(self) -> list[str]:
        return self.store.migrate()

    def applied_migrations(self) -> list[str]:
        return self.store.applied_migrations()

    def readiness(self) -> str | None:
        return self.store.readiness()

    def ping(self) -> None:
        self.store.ping()

    def published_changes(self) -> int | None:
        return self.store.published_changes()

    def changes_touch(self, applied: int, published: int, machine_id: str) -> bool:
        return self.store.changes_touch(applied, published, machine_id)

    def close(self) -> None:
        self.store.close()
