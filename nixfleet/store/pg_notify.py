"""Change numbers across replicas: NOTIFY in the committing transaction, LISTEN in each.

docs/scaling.md "Caches across replicas". On SQLite every process reads the last
committed `cache_changes` number from a memory-mapped file (`Store.published_changes`).
On PostgreSQL the transaction that writes a change also calls `notify(conn, seq)`;
the server delivers notifications only for committed transactions, in commit order,
to every listening session of the database. `ChangeListener` keeps one such session
per process, on a connection of its own (not the pool's), in a thread: `published()`
is the highest number received, or None while it is not connected — then nothing
can be trusted to be current, and the report path takes its full transaction.
After (re)connecting it LISTENs first and only then asks `seed` for the current
number, so no change committed in between is missed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import psycopg

from nixfleet.store.conn import Connection

log = logging.getLogger(__name__)

CHANNEL = "nixfleet_changes"
RECONNECT_AFTER = 0.5  # seconds between attempts while the server is unreachable
POLL = 0.5  # seconds the thread waits for a notification before checking `stop`


def notify(conn: Connection, seq: int, channel: str = CHANNEL) -> None:
    """Publish change `seq` when (and only if) the transaction of `conn` commits."""
    conn.execute("SELECT pg_notify(?, ?)", (channel, str(seq)))


class ChangeListener:
    """The highest change number committed anywhere, as this process has heard it."""

    def __init__(
        self,
        conninfo: str,
        seed: Callable[[psycopg.Connection[Any]], int],
        channel: str = CHANNEL,
    ) -> None:
        self.conninfo = conninfo
        self.seed = seed
        self.channel = channel
        self._published: int | None = None
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nixfleet-listen", daemon=True)

    def start(self) -> ChangeListener:
        self._thread.start()
        return self

    def published(self) -> int | None:
        with self._cond:
            return self._published

    def wait_for(self, seq: int, timeout: float) -> bool:
        """Whether `published()` reached `seq` within `timeout` seconds."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._published is not None and self._published >= seq, timeout
            )

    def _set(self, value: int | None) -> None:
        with self._cond:
            if value is None or self._published is None or value > self._published:
                self._published = value
            self._cond.notify_all()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with psycopg.connect(
                    self.conninfo,
                    autocommit=True,
                    application_name="nixfleet-listen",
                    connect_timeout=5,
                ) as conn:
                    conn.execute(f'LISTEN "{self.channel}"')
                    self._set(self.seed(conn))
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=POLL):
                            if note.payload.isdigit():
                                self._set(int(note.payload))
            except psycopg.Error as e:
                if self._stop.is_set():
                    break
                log.warning("change listener lost its connection (%s); reconnecting", e)
            finally:
                self._set(None)
            self._stop.wait(RECONNECT_AFTER)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
