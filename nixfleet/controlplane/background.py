"""The control plane's background thread: reconcile rollouts, tick after tick.

Each tick is one transaction (see nixfleet.reconciler); a tick that fails is
logged and retried on the next interval, never fatal to the server.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from nixfleet import gitops, reconciler
from nixfleet.settings import Settings
from nixfleet.store import Store

log = logging.getLogger("nixfleet.controlplane.background")

Job = Callable[[Settings, Store], None]


def checkpoint(settings: Settings, store: Store) -> None:
    """Copy the WAL back into the database file, outside any write transaction.

    The writer connection never checkpoints inside a COMMIT (store.db.Store), so a
    tick that rewrites many rows does not also pay for copying them; this job does
    it right after the tick and keeps the WAL bounded.
    """
    store.checkpoint()


# Jobs run in order every interval.
JOBS: list[Job] = [gitops.job, reconciler.job, checkpoint]


def run_once(settings: Settings, store: Store) -> None:
    for job in JOBS:
        try:
            job(settings, store)
        except Exception:
            log.exception("background job %s failed; retrying next tick", job.__name__)


def start(settings: Settings, store: Store, stop: threading.Event) -> threading.Thread:
    def loop() -> None:
        while not stop.is_set():
            run_once(settings, store)
            stop.wait(settings.reconcile_interval)

    thread = threading.Thread(target=loop, name="nixfleet-background", daemon=True)
    thread.start()
    return thread
