"""The control plane's background thread: reconcile rollouts, tick after tick.

Each tick is one transaction (see nixfleet.reconciler); a tick that fails is
logged and retried on the next interval, never fatal to the server.

On SQLite the one control-plane process is always the leader. On PostgreSQL any
number of replicas share the database and only the leader runs the jobs and the
webhook sender (docs/scaling.md "Several replicas: one leader"): the loop asks
for the lock once a second, runs the jobs through `leader.Fenced` (every write
transaction checks the epoch first) while it holds it, and stops the sender the
moment it finds the lock lost.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import timedelta

from nixfleet import gitops, reconciler
from nixfleet.controlplane import retention, webhooks
from nixfleet.models import utcnow
from nixfleet.settings import Settings
from nixfleet.store import history, report_cache
from nixfleet.store.backends import is_sqlite
from nixfleet.store.conn import AnyStore
from nixfleet.store.db import Store

log = logging.getLogger("nixfleet.controlplane.background")

Job = Callable[[Settings, AnyStore], None]
# Pooled connections the background thread and the webhook sender may hold at once
# beyond the request threads' (PostgreSQL's pool is sized to both).
CONNECTIONS = 4
ELECTION_INTERVAL = 1.0  # seconds between a follower's tries for the leader's lock


def checkpoint(settings: Settings, store: AnyStore) -> None:
    """Copy the WAL back into the database file, outside any write transaction.

    The writer connection never checkpoints inside a COMMIT (store.db.Store), so a
    tick that rewrites many rows does not also pay for copying them; this job does
    it right after the tick and keeps the WAL bounded.
    """
    if isinstance(store, Store):
        store.checkpoint()


class PruneHistory:
    """Prune machine history by age and per-machine cap (DESIGN §3 History).

    Never on the report path: here, at most every `every` seconds, in short
    transactions (a chunk of machines each, both bounds at once), so reports interleave.
    """

    MACHINES = 2_000  # machines per transaction

    def __init__(self, every: float = 600.0) -> None:
        self.every = every
        self.last: float | None = None
        self.__name__ = "prune_history"

    def __call__(self, settings: Settings, store: AnyStore) -> None:
        now = time.monotonic()
        if self.last is not None and now - self.last < self.every:
            return
        self.last = now
        prune_history(settings, store, self.MACHINES)


def prune_history(settings: Settings, store: AnyStore, machines: int) -> int:
    """Everything older than history_days and each machine's beyond history_max_events."""
    cutoff = utcnow() - timedelta(days=settings.history_days)
    deleted = 0
    after: int | None = 0
    while after is not None:
        with store.transaction() as conn:
            n, after = history.prune(conn, cutoff, settings.history_max_events, after, machines)
        deleted += n
    if deleted:
        log.info("pruned %d history events", deleted)
    return deleted


def prune_cache_changes(settings: Settings, store: AnyStore) -> None:
    """The report cache's change list keeps its newest rows (store.report_cache)."""
    with store.transaction() as conn:
        report_cache.prune(conn)


# Jobs run in order every interval.
JOBS: list[Job] = [
    gitops.job,
    reconciler.job,
    PruneHistory(),
    retention.PruneDeployments(),
    prune_cache_changes,
    checkpoint,
]


def run_once(settings: Settings, store: AnyStore) -> None:
    for job in JOBS:
        try:
            job(settings, store)
        except Exception:
            log.exception("background job %s failed; retrying next tick", job.__name__)


def start(settings: Settings, store: AnyStore, stop: threading.Event) -> threading.Thread:
    """The background thread: the jobs every reconcile_interval, as leader only."""
    if is_sqlite(store):
        target = lambda: _lead(settings, store, stop)  # noqa: E731
    else:
        target = lambda: _elect(settings, store, stop)  # noqa: E731
    thread = threading.Thread(target=target, name="nixfleet-background", daemon=True)
    thread.start()
    return thread


def _lead(
    settings: Settings,
    store: AnyStore,
    stop: threading.Event,
    held: Callable[[], bool] = lambda: True,
) -> None:
    """Run the jobs and the webhook sender until `stop`, or until `held()` turns false."""
    lost = threading.Event()  # the sender's stop: set by either
    senders = webhooks.start(settings, store, lost)  # the sender runs where the loop runs
    try:
        while not stop.is_set():
            run_once(settings, store)
            deadline = time.monotonic() + settings.reconcile_interval
            while True:  # the interval, asking `held` at least once a second
                if not held():
                    return
                left = deadline - time.monotonic()
                if stop.is_set() or left <= 0:
                    break
                stop.wait(min(ELECTION_INTERVAL, left))
    finally:
        lost.set()
        for sender in senders:  # an attempt in flight ends within its deadline
            sender.join(timeout=settings.webhook_timeout + 5)


def _elect(settings: Settings, store: AnyStore, stop: threading.Event) -> None:
    """PostgreSQL: follow until this replica takes the leader's lock, then lead."""
    from nixfleet.store.leader import Fenced, Leadership  # psycopg: PostgreSQL only

    conninfo = settings.database.conninfo
    assert conninfo is not None
    leadership = Leadership(conninfo, f"{socket.gethostname()}:{os.getpid()}")
    try:
        while not stop.is_set():
            try:
                epoch = leadership.try_acquire()
            except Exception:  # e.g. an unmigrated database: keep trying, as a follower
                log.exception("leader election failed; trying again")
                epoch = None
            if epoch is None:
                stop.wait(ELECTION_INTERVAL)
                continue
            _lead(settings, Fenced(store, leadership), stop, leadership.held)
    finally:
        leadership.release()
