"""The report path's memory: heartbeats answered without SQLite (DESIGN §8).

Each server process keeps, for every machine, what a report is answered from
(token → machine, desired generation, cache URL, retry request, its running
rollout's poll hint, confirm window and reboot policy) and what it is judged
against (nixfleet.heartbeat.Known). A report that `is_heartbeat` says changes
nothing is answered from here and its last-seen time queued; a background thread
writes the queue in one transaction at most FLUSH_AFTER after the first answer in
it (so at most ~1 s is lost on kill -9), and on a clean shutdown. Every other
report, and every report while this view may be behind, takes the full
transaction (api.report), which is always right.

Staying right under every writer (docs/control-plane.md "Heartbeats"):
- Every change to what the view holds appends a `cache_changes` row in the
  changing transaction (triggers; the tick's bulk desired writes record their
  chunk). Each commit through a Store (any process: workers, the reconciler,
  operators' requests, the GitOps watcher, host commands) publishes its rows in a
  file every process memory-maps (store.changes), after COMMIT and before it
  answers. A machine is answered from memory only when no published row after the
  last one this process applied concerns it (or every machine: a rollout's), so a
  change committed before a report arrives is never answered from memory: a
  revoked token, a new desired generation, a decommissioned machine take effect
  at the next request. Commits that change nothing the view holds (the
  heartbeats' batches, most reports' own transactions) publish nothing.
- The background thread then catches up: it reads the rows after the last one it
  applied and reloads exactly those machines and rollouts.
- A write that bypasses Store (the sqlite3 shell) moves `PRAGMA data_version`,
  which the same thread checks every POLL seconds; until it has caught up the view
  may answer as before that write (≤ ~0.1 s).

On PostgreSQL (store.pg.PgStore) the same holds with the numbers published by
NOTIFY (store.pg_notify): the store's own commits are known before they return, the
other replicas' within the notification's latency; while the listening connection
is down nothing is answered from memory. Every writer goes through the triggers
there, so no data_version is polled; the thread reads on a pooled connection.
"""

from __future__ import annotations

import gc
import json
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from nixfleet import gcpause, wire
from nixfleet.heartbeat import is_heartbeat
from nixfleet.models import isoformat
from nixfleet.store import Store
from nixfleet.store import report_cache as rc
from nixfleet.store.conn import AnyStore, Connection
from nixfleet.store.credentials import token_digest
from nixfleet.store.report_cache import CachedMachine, CachedRollout

log = logging.getLogger(__name__)

FLUSH_AFTER = 0.25  # seconds from a heartbeat's answer until its batch is written
POLL = 0.05  # seconds between the background thread's checks
CATCH_UP_EVERY = 0.05  # seconds: the least time between two catch-ups


def answer(
    desired: str | None,
    cache_url: str | None,
    poll_hint: int | None,
    retry_requested_at: str | None,
    reboot: str | None,
    confirm_timeout: int | None,
) -> wire.ReportAnswer:
    """The report's answer (DESIGN §4), the same from memory as from the transaction."""
    out: wire.ReportAnswer = {
        "desired_generation": desired,
        "cache_url": cache_url,
        "poll_hint": poll_hint,
        "retry_requested_at": retry_requested_at,
    }
    if reboot is not None:
        # The machine needs a reboot and its rollout coordinates one (DESIGN §11): the
        # agent then asks for a reboot lease.
        out["reboot"] = reboot
    out["confirm_timeout"] = confirm_timeout
    return out


class ReportCache:
    def __init__(self, store: AnyStore, default_poll_interval: int | None = None) -> None:
        self.store = store
        # SQLite: the thread's own connection, whose data_version counts the others' commits.
        self._sqlite = store if isinstance(store, Store) else None
        self.default_poll_interval = default_poll_interval
        self._machines: dict[str, CachedMachine] = {}
        self._tokens: dict[bytes, str] = {}
        self._rollouts: dict[str, CachedRollout] = {}
        self._seq = 0  # the last cache_changes row applied
        self._data_version: int | None = None
        self._wanted: set[str] = set()
        self._pending: dict[str, tuple[datetime, int | None]] = {}
        self._answers: dict[str, tuple[CachedMachine, CachedRollout | None, bytes]] = {}
        self._caught_up_at = 0.0
        self._oldest = 0.0
        self._pending_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loaded = False
        self._writable = True  # the last flush succeeded (else answer nothing from memory)
        self.heartbeats = 0  # answered from memory (approximate: not locked)
        self.flushes = 0

    # --- the request side: no SQLite ------------------------------------------------

    def _fresh(self, machine_id: str) -> bool:
        """Whether the view holds everything committed about this machine (and rollouts)."""
        published = self.store.published_changes()
        if not self._loaded or published is None or not self._writable:
            return False
        applied = self._seq
        if published <= applied:
            return True
        self._wake.set()
        return not self.store.changes_touch(applied, published, machine_id)

    def token_machine(self, token: str) -> CachedMachine | None:
        """The machine whose token this is, when the view is current; else None (ask SQLite)."""
        machine_id = self._tokens.get(token_digest(token))
        if machine_id is None or not self._fresh(machine_id):
            return None
        return self._machines.get(machine_id)

    def heartbeat(
        self,
        machine_id: str,
        body: Mapping[str, Any],
        now: datetime,
        entry: CachedMachine | None = None,
    ) -> bytes | None:
        """The answer to a heartbeat, as JSON (its last-seen queued); None: store the report.

        `entry`: the machine's entry as `token_machine` found it current for this
        request (saves asking again). The answer's text is kept per machine until its
        entry or rollout changes."""
        if entry is not None and entry.id == machine_id:
            m: CachedMachine | None = entry
        elif self._fresh(machine_id):
            m = self._machines.get(machine_id)
        else:
            return None
        if m is None or not is_heartbeat(m.known, body):
            return None
        with self._pending_lock:
            if not self._pending:
                self._oldest = time.monotonic()
            self._pending[machine_id] = (now, body.get("uptime_seconds"))
        self.heartbeats += 1
        rollout = next((r for r in map(self._rollouts.get, m.rollouts) if r is not None), None)
        done = self._answers.get(machine_id)
        if done is not None and done[0] is m and done[1] is rollout:
            return done[2]
        text = json.dumps(self._answer(m, rollout), ensure_ascii=False).encode()
        self._answers[machine_id] = (m, rollout, text)
        return text

    def _answer(self, m: CachedMachine, rollout: CachedRollout | None) -> wire.ReportAnswer:
        if rollout is None:
            return answer(
                m.desired_generation,
                m.desired_cache_url,
                self.default_poll_interval,
                m.retry_requested_at,
                None,
                None,
            )
        reboot = (
            rollout.reboot if m.known.needs_reboot and rollout.reboot == "when-needed" else None
        )
        return answer(
            m.desired_generation,
            m.desired_cache_url,
            rollout.poll_hint or self.default_poll_interval,
            m.retry_requested_at,
            reboot,
            rollout.confirm_timeout,
        )

    def stored(self, machine_id: str) -> None:
        """A report was stored by the transaction: load the machine if the view lacks it."""
        if machine_id not in self._machines:
            self._wanted.add(machine_id)
            self._wake.set()

    # --- the background thread --------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._loop, name="nixfleet-report-cache", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop the thread and write what is queued (a clean shutdown loses nothing)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.flush()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if not self._loaded:
                    self.load()
                self._wake.wait(POLL)
                self._wake.clear()
                # At most every CATCH_UP_EVERY: under a stream of commits (every report a
                # change) catching up after each would double the cost of each; only
                # the changed machines wait for it (store.changes).
                wait = self._caught_up_at + CATCH_UP_EVERY - time.monotonic()
                if wait > 0:
                    self._stop.wait(wait)
                self.catch_up()
                self._caught_up_at = time.monotonic()
                if self._pending and time.monotonic() - self._oldest >= FLUSH_AFTER:
                    self.flush()
            except Exception:
                log.exception("report cache: retrying in 1 s")
                self._stop.wait(1.0)

    def load(self) -> None:
        """Everything, from one snapshot (at start, and after falling behind the pruning)."""
        self._loaded = False
        started = time.monotonic()
        # A million objects that live as long as the process: no cyclic collection
        # while they are made (~20 % of the load's CPU), then frozen (gc.freeze), so a
        # full collection under load no longer walks them (~0.1 s each at 100,000
        # machines, a stall of every request of the process).
        with gcpause.paused():
            with self.store.read() as conn:
                version = rc.data_version(conn)
                seq = rc.last_seq(conn)
                found, _ = rc.load_machines(conn)
                rollouts, _ = rc.running_rollouts(conn)
            self._machines = {m.id: m for m in found}
            self._tokens = {m.token_hash: m.id for m in found if m.token_hash is not None}
            self._rollouts = {r.id: r for r in rollouts}
            self._answers = {}
            del found
        gc.freeze()
        self._seq, self._data_version = seq, version
        self._loaded = True
        log.info(
            "report cache: %d machines loaded in %.2f s",
            len(self._machines),
            time.monotonic() - started,
        )

    def catch_up(self) -> None:
        """Apply what was committed since the last catch-up (nothing new: two cheap reads)."""
        published = self.store.published_changes()
        if published is None:
            return  # not published (no signal file, or not listening): the view never serves
        with self._connection() as conn:
            missed = self._catch_up(conn, published)
        if missed:
            self.load()

    @contextmanager
    def _connection(self) -> Iterator[Connection]:
        if self._sqlite is not None:
            yield self._sqlite.connection()
        else:
            with self.store.lookup() as conn:
                yield conn

    def _catch_up(self, conn: Connection, published: int) -> bool:
        """False, or True when the changes to apply were pruned (then: load everything)."""
        version = rc.data_version(conn)
        if published <= self._seq and version == self._data_version and not self._wanted:
            return False
        # Requests take the transaction until _seq moves (below), except after a change
        # nobody published (data_version): those may be answered as before it until then.
        wanted = set(self._wanted)
        # No read transaction: the rows loaded after the changes were read are at least
        # as new as those changes (a later change is applied again next time).
        changes = rc.changes_since(conn, self._seq)
        missed = (  # pruned meanwhile
            bool(changes) and changes[0].seq != self._seq + 1 and rc.pruned_before(conn, self._seq)
        )
        if missed:
            log.warning("report cache: fell behind the pruned changes; reloading")
        else:
            ids, rollout_ids = set(wanted), set()
            for c in changes:
                if c.kind == "machine" and c.machine_id is not None:
                    ids.add(c.machine_id)
                elif c.kind == "rollout" and c.rollout_id is not None:
                    rollout_ids.add(c.rollout_id)
                elif c.rollout_id is not None:
                    ids.update(rc.members(conn, c.rollout_id, c.lo, c.hi))
            found, gone = rc.load_machines(conn, ids) if ids else ([], [])
            rollouts, stopped = (
                rc.running_rollouts(conn, sorted(rollout_ids)) if rollout_ids else ([], [])
            )
        if missed:
            return True
        for m in found:
            self._put(m)
        for machine_id in gone:
            self._drop(machine_id)
        for r in rollouts:
            self._rollouts[r.id] = r
        for rollout_id in stopped:
            self._rollouts.pop(rollout_id, None)
        self._wanted -= wanted
        self._data_version = version
        if changes:
            self._seq = changes[-1].seq
        return False

    def _put(self, m: CachedMachine) -> None:
        old = self._machines.get(m.id)
        if old is not None and old.token_hash is not None and old.token_hash != m.token_hash:
            self._tokens.pop(old.token_hash, None)
        self._machines[m.id] = m
        if m.token_hash is not None:
            self._tokens[m.token_hash] = m.id

    def _drop(self, machine_id: str) -> None:
        self._answers.pop(machine_id, None)
        old = self._machines.pop(machine_id, None)
        if old is not None and old.token_hash is not None:
            self._tokens.pop(old.token_hash, None)

    def flush(self) -> None:
        """Write the queued last-seen times in one transaction."""
        with self._pending_lock:
            rows, self._pending = self._pending, {}
        if not rows:
            return
        try:
            # In key order: neighbours share B-tree pages (~10 % less work, lock held less).
            seen = [(m, isoformat(at), up) for m, (at, up) in sorted(rows.items())]
            with self.store.transaction() as conn:
                rc.write_last_seen(conn, seen)
        except Exception:
            # Until a batch is written again, reports take the transaction: they are
            # refused as it is (503, disk full or a replaced file) instead of being
            # acknowledged from memory and lost.
            self._writable = False
            with self._pending_lock:  # kept for the next attempt; newer ones win
                self._pending = {**rows, **self._pending}
                self._oldest = time.monotonic() - FLUSH_AFTER
            raise
        self._writable = True
        self.flushes += 1
