"""Which machines changed, told to every process without SQLite: `<db>.changes`.

A commit that appended `cache_changes` rows (what the report path's in-memory view,
nixfleet.api.report_cache, depends on) writes them here too, after COMMIT and
before its caller answers, under the write flock (so in commit order): each row as
(seq, key) in a ring of RING slots — key is the machine's (a hash of its id), or
GLOBAL for a rollout's change — then the last seq in the header. A process whose
view has applied the rows up to `applied` asks `touches(applied, published, key)`:
whether any row after it may concern that machine. Usually nothing was published
since (one 8-byte read); after a change, only the changed machines (and, for a
rollout change, all) wait for the view to catch up — every other machine's
heartbeat is still answered from memory.

The file is 64 KiB, memory-mapped by every process; losing it loses nothing (a
new one is filled by the next commit). Writers that bypass Store (the sqlite3
shell) write nothing here; the view notices them through `PRAGMA data_version`.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import sqlite3
import struct
import sys
from array import array
from pathlib import Path

log = logging.getLogger(__name__)

RING = 4096  # slots
SCAN = 256  # unapplied rows a request looks through; beyond that every machine waits
HEADER = 16
SLOT = struct.Struct("<QQ")  # seq, key
SIZE = HEADER + RING * SLOT.size
GLOBAL = 0  # the key of a change that may concern every machine

Pending = tuple[list[tuple[int, int]], int | None]  # (seq, key) rows, the last seq


def key(machine_id: str) -> int:
    """A machine's 64-bit key (never GLOBAL)."""
    k = int.from_bytes(hashlib.blake2b(machine_id.encode(), digest_size=8).digest(), "little")
    return k or 1


class ChangeSignal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._map: mmap.mmap | None = None
        self._failed = False

    def _mapped(self) -> mmap.mmap | None:
        if self._map is None and not self._failed:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    if os.fstat(fd).st_size < SIZE:
                        os.ftruncate(fd, SIZE)
                    self._map = mmap.mmap(fd, SIZE)
                finally:
                    os.close(fd)
            except OSError as e:
                self._failed = True  # published() is None: nothing may trust the view
                log.warning("no change signal at %s (%s)", self.path, e.strerror)
        return self._map

    def published(self) -> int | None:
        """The last row published (None: no signal file, so never trust a view)."""
        m = self._mapped()
        return None if m is None else int(struct.unpack_from("<Q", m)[0])

    def touches(self, applied: int, published: int, machine: int) -> bool:
        """Whether a row in (applied, published] may concern the machine with key `machine`."""
        m = self._mapped()
        if m is None or published - applied > SCAN:
            return True
        if published <= applied:
            return False
        # The slots as one copy of at most SCAN * 16 bytes (two at the ring's end),
        # compared in C: under a stream of changes a request looks through ~100 rows,
        # which slot by slot took ~50 µs.
        first, last = (applied + 1) % RING, published % RING
        if first <= last:
            raw = m[HEADER + first * SLOT.size : HEADER + (last + 1) * SLOT.size]
        else:
            raw = m[HEADER + first * SLOT.size : SIZE] + m[HEADER : HEADER + (last + 1) * SLOT.size]
        words = array("Q", raw)
        if sys.byteorder == "big":
            words.byteswap()  # the file is little-endian
        keys = words[1::2]
        # A slot overwritten meanwhile (a newer seq) is unknown, so it may.
        return (
            words[0::2] != array("Q", range(applied + 1, published + 1))
            or machine in keys
            or GLOBAL in keys
        )

    def pending(self, conn: sqlite3.Connection) -> Pending:
        """Inside the write transaction: its rows (and any a bypassing writer added)."""
        start = self.published()
        if start is None:
            return [], None
        try:
            rows = conn.execute(
                "SELECT seq, kind, machine_id FROM cache_changes WHERE seq > ? "
                "UNION ALL SELECT seq, NULL, NULL FROM sqlite_sequence "
                "WHERE name = 'cache_changes'",
                (start,),
            ).fetchall()
        except sqlite3.OperationalError:
            return [], None  # before migration 0014 (or no AUTOINCREMENT table yet)
        last = 0
        out = []
        for seq, kind, machine_id in rows:
            if kind is None:
                last = int(seq)
            else:
                out.append((int(seq), key(machine_id) if kind == "machine" else GLOBAL))
        return out, last

    def publish(self, pending: Pending) -> None:
        """After COMMIT, under the flock: the rows, then the header."""
        rows, last = pending
        m = self._mapped()
        if m is None or last is None:
            return
        for seq, k in rows[-RING:]:
            SLOT.pack_into(m, HEADER + (seq % RING) * SLOT.size, seq, k)
        if struct.unpack_from("<Q", m)[0] != last:
            # Also when lower: a file left by an earlier database of this name.
            struct.pack_into("<Q", m, 0, last)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
