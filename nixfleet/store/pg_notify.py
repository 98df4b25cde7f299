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

The numbers commit in order: writing a `cache_changes` row (the SQL function
`cache_change`, 0004_baseline.sql) first takes `pg_advisory_xact_lock(locks.CHANGES)`,
held to the commit. Its notification names the row's machine ("seq machine_id"; a
bare "seq" may concern every machine), and the listener keeps the last RING of them,
so `touches` answers what `store.changes.ChangeSignal.touches` answers on SQLite:
whether a change after the view's last applied one may concern this machine, without
a query. `heard` takes the same lines from the store's own committed transactions
(their NOTICEs, store.pg.PgStore.transaction), before the notifications arrive.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

import psycopg

from nixfleet.store.conn import Connection

log = logging.getLogger(__name__)

CHANNEL = "nixfleet_changes"
RING = 4096  # notifications `touches` can look through; older ones are forgotten
SCAN = 256  # changes after the view's a request looks through; beyond: every machine waits
RECONNECT_AFTER = 0.5  # seconds between attempts while the server is unreachable
POLL = 0.5  # seconds the thread waits for a notification before checking `stop`


def notify(conn: Connection, seq: int, channel: str = CHANNEL) -> None:
    """Publish change `seq` when (and only if) the transaction of `conn` commits."""
    conn.execute("SELECT pg_notify(?, ?)", (channel, str(seq)))


def parse(payload: str) -> tuple[int, str | None] | None:
    """A notification's (seq, machine_id); machine None: it may concern every machine."""
    seq, _, machine = payload.partition(" ")
    if not seq.isdigit():
        return None
    return int(seq), machine or None


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
        self._seqs: list[int] = []  # the changes heard, in order, and their machines
        self._machines: dict[int, str | None] = {}
        self._complete_after = 0  # every change committed after it is in _seqs, once heard
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

    def touches(self, applied: int, published: int, machine_id: str) -> bool:
        """Whether a change in (applied, published] may concern the machine."""
        with self._cond:
            if applied < self._complete_after:
                return True  # not heard (before the seed, or forgotten): unknown
            lo = bisect.bisect_right(self._seqs, applied)
            hi = bisect.bisect_right(self._seqs, published)
            if hi - lo > SCAN:
                return True
            for seq in self._seqs[lo:hi]:
                machine = self._machines[seq]
                if machine is None or machine == machine_id:
                    return True
            return False

    def heard(self, payloads: Iterable[str]) -> None:
        """Changes this process committed (the highest is published, unless disconnected)."""
        with self._cond:
            last = max((self._add(p) for p in payloads), default=0)
            if self._published is not None and last > self._published:
                self._published = last
                self._cond.notify_all()

    def _add(self, payload: str) -> int:
        """Keep one change (under _cond); its number, 0 if the payload is not one."""
        change = parse(payload)
        if change is None:
            return 0
        seq, machine = change
        if seq not in self._machines:
            bisect.insort(self._seqs, seq)  # the own ones may come before others' (heard)
            self._machines[seq] = machine
            if len(self._seqs) > RING:
                old = self._seqs[: RING // 4]
                del self._seqs[: RING // 4]
                for s in old:
                    del self._machines[s]
                self._complete_after = max(self._complete_after, old[-1])
        return seq

    def _set(self, value: int | None, seed: bool = False) -> None:
        with self._cond:
            if seed and value is not None:
                self._complete_after = max(self._complete_after, value)
            if value is None or self._published is None or value > self._published:
                self._published = value
            self._cond.notify_all()

    def _heard(self, payload: str) -> None:
        with self._cond:
            seq = self._add(payload)
        if seq:
            self._set(seq)

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
                    self._set(self.seed(conn), seed=True)
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=POLL):
                            self._heard(note.payload)
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
