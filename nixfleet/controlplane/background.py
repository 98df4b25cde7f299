"""The control plane's background thread: reconcile rollouts, tick after tick.

Each tick is one transaction (see nixfleet.reconciler); a tick that fails is
logged and retried on the next interval, never fatal to the server.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta

from nixfleet import gitops, reconciler
from nixfleet.controlplane import retention, webhooks
from nixfleet.models import utcnow
from nixfleet.settings import Settings
from nixfleet.store import Store, history, report_cache
from nixfleet.store.conn import AnyStore

log = logging.getLogger("nixfleet.controlplane.background")

Job = Callable[[Settings, Store], None]


def checkpoint(settings: Settings, store: Store) -> None:
    """Copy the WAL back into the database file, outside any write transaction.

    The writer connection never checkpoints inside a COMMIT (store.db.Store), so a
    tick that rewrites many rows does not also pay for copying them; this job does
    it right after the tick and keeps the WAL bounded.
    """
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

    def __call__(self, settings: Settings, store: Store) -> None:
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


def prune_cache_changes(settings: Settings, store: Store) -> None:
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


def run_once(settings: Settings, store: Store) -> None:
    for job in JOBS:
        try:
            job(settings, store)
        except Exception:
            log.exception("background job %s failed; retrying next tick", job.__name__)


def start(settings: Settings, store: Store, stop: threading.Event) -> threading.Thread:
    def loop() -> None:
        senders = webhooks.start(settings, store, stop)  # the sender runs where the loop runs
        while not stop.is_set():
            run_once(settings, store)
            stop.wait(settings.reconcile_interval)
        for sender in senders:  # an attempt in flight ends within its deadline
            sender.join(timeout=settings.webhook_timeout + 5)

    thread = threading.Thread(target=loop, name="nixfleet-background", daemon=True)
    thread.start()
    return thread
