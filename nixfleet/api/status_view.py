"""GET /api/v1/status of the whole fleet, kept in memory and brought up to date per request.

Writing every machine's entry is ~5 µs of SQLite per machine (json_object or printf
alike: docs/performance.md), 0.5-0.9 s at 100,000 machines, over the 500 ms of
DESIGN §8. Almost none of it changes between two requests, so each process keeps
every machine's entry as the database wrote it, without the two fields that move
by themselves (store.status.SPLICED: the last report's time, which every heartbeat
moves, and stale, which time alone moves), and per request, in one snapshot:

1. applies the `cache_changes` rows after the last one it applied (the feed the
   report cache follows, api.report_cache: every change to a machine's state,
   lifecycle, tags or desired generation, and every new machine, appends one in its
   own transaction), reading exactly the machines they name again;
2. reads every machine's id and last-report time, and the stale count
   (store.status.report_times);
3. writes each machine's tail from its time, stale decided as STALE_SQL decides it.

The counts of the summary come from the kept (lifecycle, sync, health) of each
machine and the stale count of step 2, so they describe the same snapshot as the
array. A machine count that differs from the view's (a machine deleted or added
behind the Store's back, with the sqlite3 shell), or changes pruned before they were
applied, reload everything; the server loads it at start (preload). Filtered or
sorted requests are written by the database itself (store.status.status_document).
Held to status_document entry by entry and count by count (tests/api/test_status_view.py).
"""

from __future__ import annotations

import bisect
import io
import itertools
import json
import logging
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import datetime

from nixfleet.models import (
    Health,
    Lifecycle,
    Sync,
    counts_in_sync_summary,
    isoformat,
    stale_cutoff,
)
from nixfleet.store import report_cache as rc
from nixfleet.store import status
from nixfleet.store.conn import AnyStore, Connection

# More changed machines than these (and than a quarter of the fleet): load them all,
# one statement without the list of ids.
RELOAD_AT, RELOAD_FRACTION = 1_000, 4

log = logging.getLogger(__name__)

_DECOMMISSIONED = Lifecycle.DECOMMISSIONED.value
_FRESH, _STALE = b',"stale":false},', b',"stale":true},'
_FRESH_Q, _STALE_Q = b'"' + _FRESH, b'"' + _STALE  # after a time that needs no escape
_NEVER = b'null,"stale":false},'  # never reported: never stale (models.is_stale)
_TIME_BYTES = b"0123456789-:.TZ\n"

Axes = tuple[str, str, str]  # lifecycle, sync, health (stored spellings)


class StatusView:
    def __init__(self, store: AnyStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._seq: int | None = None  # the last change applied; None: nothing loaded
        # In id order, one item per machine: its id (UTF-8, whose byte order is the
        # database's), its entry up to `"last_report_at":`, and its axes (one tuple
        # object per distinct value: a few dozen in all).
        self._ids: list[bytes] = []
        self._heads: list[bytes] = []
        self._axes: list[Axes] = []
        self._shared: dict[Axes, Axes] = {}
        self.reloads = 0  # full loads (the first one included): for tests and logs

    def document(
        self, now: datetime, stale_after: int
    ) -> tuple[list[bytes], list[bytes], status.Counts] | None:
        """Every machine's entry as two pieces, its head and its tail (the SPLICED
        fields, the comma after it), in id order, and their counts, as of now; None
        when a machine's id cannot be told apart in the times' string (a newline in
        it, written beside Store): then the database writes the document."""
        cutoff = isoformat(stale_cutoff(now, stale_after))
        before = cutoff.encode()
        with self._lock, self.store.read() as conn:
            self._catch_up(conn)
            ids, joined, n, stale = status.report_times(conn, cutoff)
            if n != len(self._ids):  # a machine added or removed beside Store
                self._load(conn)
            if not n:
                return [], [], _counts([], 0)
            keys, values = ids.split(b"\n"), joined.split(b"\n")
            if not len(keys) == len(values) == n == len(self._ids):
                return None
            seen = dict(zip(keys, values, strict=True))
            try:
                times = list(map(seen.__getitem__, self._ids))
            except KeyError:
                return None
            # Stale as STALE_SQL (which counted them): reported before the cutoff, and
            # not decommissioned. Stored times are models.TIME_FORMAT, which needs no
            # JSON escape; any other (a write beside Store) is quoted, at a cost then.
            axes = self._axes
            if joined.translate(None, _TIME_BYTES):
                tails = [
                    (_quote(t) + (_STALE if t < before and a[0] != _DECOMMISSIONED else _FRESH))
                    if t
                    else _NEVER
                    for t, a in zip(times, axes, strict=True)
                ]
            else:
                tails = [
                    (b'"' + t + (_STALE_Q if t < before and a[0] != _DECOMMISSIONED else _FRESH_Q))
                    if t
                    else _NEVER
                    for t, a in zip(times, axes, strict=True)
                ]
            counts = _counts(axes, stale)
            heads = self._heads[:]  # later requests change the view while this one is sent
        tails[-1] = tails[-1][:-1]  # the last entry's comma
        return heads, tails, counts

    def preload(self) -> None:
        """Load every entry now (the server's start), so that no request waits for it."""
        try:
            with self._lock, self.store.read() as conn:
                if self._seq is None:
                    self._load(conn)
        except Exception as e:  # the first request loads it then, or says what is wrong
            log.warning("status view: not loaded at start (%s); the first request loads it", e)
            return
        log.info("status view: %d machines loaded", len(self._ids))

    def _catch_up(self, conn: Connection) -> None:
        if self._seq is None:
            self._load(conn)
            return
        changes = rc.changes_since(conn, self._seq)
        if not changes:
            return
        if changes[0].seq != self._seq + 1 and rc.pruned_before(conn, self._seq):
            self._load(conn)
            return
        ids: set[str] = set()
        for c in changes:
            if c.kind == "machine" and c.machine_id is not None:
                ids.add(c.machine_id)
            elif c.kind == "members" and c.rollout_id is not None:
                ids.update(rc.members(conn, c.rollout_id, c.lo, c.hi))
        if len(ids) > RELOAD_AT and len(ids) * RELOAD_FRACTION > len(self._ids):
            self._load(conn)
            return
        if ids:
            self._apply(ids, status.entries(conn, sorted(ids)))
        self._seq = changes[-1].seq

    def _load(self, conn: Connection) -> None:
        seq = rc.last_seq(conn)
        self._ids, self._heads, self._axes = [], [], []
        self._apply(set(), status.entries(conn, None))
        self._seq = seq
        self.reloads += 1

    def _apply(self, ids: set[str], rows: Sequence[tuple[str, str, str, str, str]]) -> None:
        """Put `rows` (in id order) in place; of `ids`, those without a row are gone."""
        for machine_id, entry, lifecycle, sync, health in rows:
            ids.discard(machine_id)
            key = machine_id.encode()
            head = entry.encode()[:-1] + b',"last_report_at":'
            axes = self._shared.setdefault((lifecycle, sync, health), (lifecycle, sync, health))
            i = bisect.bisect_left(self._ids, key)
            if i < len(self._ids) and self._ids[i] == key:
                self._heads[i], self._axes[i] = head, axes
            else:  # a new machine (or the load, appending in order)
                self._ids.insert(i, key)
                self._heads.insert(i, head)
                self._axes.insert(i, axes)
        for machine_id in ids:
            key = machine_id.encode()
            i = bisect.bisect_left(self._ids, key)
            if i < len(self._ids) and self._ids[i] == key:
                del self._ids[i], self._heads[i], self._axes[i]


def _quote(t: bytes) -> bytes:
    return json.dumps(t.decode("utf-8", "replace"), ensure_ascii=False).encode()


def _counts(axes: list[Axes], stale: int) -> status.Counts:
    """status.counts of the kept axes (models.counts_in_sync_summary decides which count)."""
    by_lifecycle = dict.fromkeys(Lifecycle, 0)
    by_sync = dict.fromkeys(Sync, 0)
    by_health = dict.fromkeys(Health, 0)
    counted = 0
    for (lifecycle, sync, health), n in Counter(axes).items():
        life = Lifecycle(lifecycle)
        by_lifecycle[life] += n
        if counts_in_sync_summary(life):
            counted += n
            by_sync[Sync(sync)] += n
            by_health[Health(health)] += n
    return status.Counts(
        selected=len(axes),
        counted=counted,
        stale=stale,
        by_sync=by_sync,
        by_health=by_health,
        by_lifecycle=by_lifecycle,
    )


class Pieces:
    """A response body joined from its pieces as it is sent, a chunk at a time.

    waitress sends a body that can seek and tell (wsgi.file_wrapper) straight from
    it; reading 45 MiB in ~1 MiB chunks instead of joining it first saves the joined
    copy's page faults (~50-80 ms at 100,000 machines here) and its memory. waitress
    reads each range twice (once to send, once to skip what was sent) and seeks only
    back to the start of the last read or to the end for the size, so the current
    chunk is all that is kept.
    """

    def __init__(self, pieces: Iterable[bytes], size: int, chunk: int = 4096) -> None:
        self._pieces = iter(pieces)
        self.size = size
        self._chunk = chunk  # pieces per chunk (two per machine: ~1 MiB)
        self._buf = b""
        self._start = 0  # where _buf starts in the body
        self._pos = 0

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if not self._start <= base + offset <= self.size:
            raise io.UnsupportedOperation("the body is sent once, from its start")
        self._pos = base + offset
        return self._pos

    def read(self, n: int | None = -1, /) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self._pos + n)
        while self._start + len(self._buf) < end:
            more = list(itertools.islice(self._pieces, self._chunk))
            if not more:
                raise ValueError("the pieces are shorter than the size given")
            self._buf = b"".join([self._buf[self._pos - self._start :], *more])
            self._start = self._pos
        i = self._pos - self._start
        out = self._buf[i : i + end - self._pos]
        self._pos = end
        return out

    def close(self) -> None:
        self._pieces, self._buf = iter(()), b""
