"""The background job that applies deployment retention (store.retention).

At most every `every` seconds (the history job's cadence); never on the report path.
Each step is its own short transaction: condensing one rollout, pruning one release,
deleting one chunk of rows, so reports and ticks interleave with it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from nixfleet.models import utcnow
from nixfleet.settings import Settings
from nixfleet.store import retention
from nixfleet.store.conn import AnyStore

log = logging.getLogger("nixfleet.controlplane.retention")

CHUNK = 5_000  # rows deleted per transaction


@dataclass
class Pruned:
    rollouts: int = 0  # condensed
    rollout_machines: int = 0  # rows deleted
    releases: int = 0  # pruned
    release_entries: int = 0  # rows deleted


def prune_deployments(
    settings: Settings, store: AnyStore, chunk: int = CHUNK, now: datetime | None = None
) -> Pruned:
    """Condense finished rollouts, prune releases nothing needs, delete their rows."""
    now = now or utcnow()
    cutoff = now - timedelta(days=settings.rollout_retention_days)
    detail_cutoff = now - timedelta(hours=settings.rollout_detail_hours)
    deployed_cutoff = now - timedelta(days=settings.release_retention_days)
    out = Pruned()
    with store.read() as conn:
        rollouts = retention.finished_rollouts(conn, detail_cutoff)
    for rid in rollouts:
        with store.transaction() as conn:
            out.rollouts += retention.condense_rollout(conn, rid, now)
    with store.read() as conn:
        releases = retention.release_candidates(conn, cutoff, deployed_cutoff)
    for release_id in releases:
        with store.transaction() as conn:
            out.releases += retention.prune_release(conn, release_id, cutoff, deployed_cutoff, now)
    while True:
        with store.transaction() as conn:
            n = retention.delete_rollout_machines(conn, chunk, cutoff)
        out.rollout_machines += n
        if not n:
            break
    while True:
        with store.transaction() as conn:
            n = retention.delete_release_entries(conn, chunk)
        out.release_entries += n
        if not n:
            break
    if out != Pruned():
        log.info(
            "retention: %d rollouts condensed (%d machine rows), %d releases pruned (%d entries)",
            out.rollouts,
            out.rollout_machines,
            out.releases,
            out.release_entries,
        )
    return out


class PruneDeployments:
    """The job: prune_deployments at most every `every` seconds."""

    def __init__(self, every: float = 600.0) -> None:
        self.every = every
        self.last: float | None = None
        self.__name__ = "prune_deployments"

    def __call__(self, settings: Settings, store: AnyStore) -> None:
        now = time.monotonic()
        if self.last is not None and now - self.last < self.every:
            return
        self.last = now
        prune_deployments(settings, store)
