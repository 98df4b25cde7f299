"""The webhook sender: outbox → signed POSTs, at least once, with capped back-off.

Runs only in the process that runs the background loop (the primary of `--workers
N`), as one coordinator thread (fan-out, stale detection, expiry, pruning) and one
thread per receiver URL, so a receiver that hangs delays only its own deliveries.
Every attempt has a total deadline (`webhook_timeout`), not one per read.

Signing (docs/webhooks.md): `X-Nixfleet-Timestamp: <unix seconds>` and
`X-Nixfleet-Signature: sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>`.
The secret is read from its file at every attempt (so it can be rotated) and is
never logged nor stored.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import http.client
import logging
import random
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from nixfleet import __version__
from nixfleet.models import utcnow
from nixfleet.settings import Settings, Webhook, display_url
from nixfleet.store import webhooks as outbox
from nixfleet.store.conn import AnyStore

log = logging.getLogger("nixfleet.controlplane.webhooks")

POLL = 0.5  # seconds between looks at the outbox when idle
STALE_EVERY = 30.0  # seconds between stale scans (a full scan of machines)
PRUNE_EVERY = 3600.0
KEEP_DAYS = 7  # finished events (and their attempts) are kept this long
RESPONSE_MAX = 4096  # bytes of a receiver's answer read (for the attempt's error text)
ERROR_MAX = 300
JITTER = 0.10


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """`sha256=` + hex HMAC-SHA256 over `timestamp.body`: what receivers recompute."""
    mac = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def backoff(attempts: int, initial: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds before the next try after `attempts` failed ones: doubling, capped, ±10%."""
    base = min(initial * 2.0 ** min(attempts - 1, 40), cap)
    return base * (rng or random).uniform(1 - JITTER, 1 + JITTER)


def read_secret(path: str) -> bytes:
    """The secret's bytes without a trailing newline; OSError names only the path."""
    return Path(path).read_bytes().rstrip(b"\r\n")


@dataclass(frozen=True)
class Outcome:
    status: int | None
    error: str | None
    duration_ms: int

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def _clean(text: str) -> str:
    text = "".join(c if c.isprintable() else " " for c in text)
    return text if len(text) <= ERROR_MAX else text[: ERROR_MAX - 3] + "..."


def post(hook: Webhook, claimed: outbox.Claimed, timeout: float) -> Outcome:
    """One attempt: sign and POST the event's body; never raises."""
    started = time.monotonic()

    def done(status: int | None, error: str | None) -> Outcome:
        ms = int((time.monotonic() - started) * 1000)
        return Outcome(status, None if error is None else _clean(error), ms)

    try:
        secret = read_secret(hook.secret_file)
    except OSError as e:
        return done(None, f"cannot read secret_file {hook.secret_file}: {e.strerror or e}")
    body = claimed.event.body()
    timestamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": f"nixfleet/{__version__}",
        "X-Nixfleet-Event": claimed.event.event,
        "X-Nixfleet-Event-Id": str(claimed.event.id),
        "X-Nixfleet-Delivery": str(claimed.delivery_id),
        "X-Nixfleet-Timestamp": timestamp,
        "X-Nixfleet-Signature": signature(secret, timestamp, body),
    }
    parts = urllib.parse.urlsplit(hook.url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = cls(parts.hostname or "", parts.port, timeout=timeout)
    # The total deadline: a receiver that trickles its answer byte by byte would
    # otherwise reset the socket timeout at every read.
    watchdog = threading.Timer(timeout, _cut, args=(conn,))
    watchdog.daemon = True
    watchdog.start()
    try:
        conn.request("POST", target, body=body, headers=headers)
        resp = conn.getresponse()
        answer = resp.read(RESPONSE_MAX)
        if 200 <= resp.status < 300:
            return done(resp.status, None)
        text = answer.decode(errors="replace").strip()
        return done(resp.status, f"HTTP {resp.status} {resp.reason}: {text}".rstrip(": "))
    except (OSError, http.client.HTTPException) as e:
        if time.monotonic() - started >= timeout:
            return done(None, f"no answer within {timeout:g}s")
        return done(None, f"{type(e).__name__}: {e}")
    finally:
        watchdog.cancel()
        conn.close()


def _cut(conn: http.client.HTTPConnection) -> None:
    sock = conn.sock
    if sock is not None:
        with suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class Sender:
    """The threads that deliver; `start` returns them (daemons: they end with the process)."""

    def __init__(self, settings: Settings, store: AnyStore, stop: threading.Event) -> None:
        self.settings = settings
        self.store = store
        self.stop = stop
        self.rng = random.Random()
        self.hooks: dict[str, Webhook] = {}
        for hook in settings.webhooks:
            self.hooks.setdefault(hook.url, hook)  # the first of a URL wins (as in fan_out)
        self._next_stale = 0.0
        self._next_prune = 0.0

    def start(self) -> list[threading.Thread]:
        threads = [self._thread(self._coordinate, "nixfleet-webhooks")]
        for i, hook in enumerate(self.hooks.values()):
            threads.append(
                self._thread(functools.partial(self._deliver, hook), f"nixfleet-webhook-{i}")
            )
        for t in threads:
            t.start()
        if self.hooks:
            log.info("delivering webhooks to %s", ", ".join(display_url(u) for u in self.hooks))
        return threads

    def _thread(self, target: Callable[[], None], name: str) -> threading.Thread:
        def guarded() -> None:
            while not self.stop.is_set():
                try:
                    target()
                except Exception:
                    if self.stop.is_set():  # the store may be closing under us
                        return
                    log.exception("webhook thread %s failed; continuing", name)
                    self.stop.wait(POLL)

        return threading.Thread(target=guarded, name=name, daemon=True)

    # --- bookkeeping ----------------------------------------------------------------

    def housekeeping(self) -> None:
        """Fan out new events; now and then announce stale machines, expire and prune."""
        s = self.settings
        now = utcnow()
        mono = time.monotonic()
        with self.store.transaction() as conn:
            if mono >= self._next_stale:
                self._next_stale = mono + min(STALE_EVERY, s.stale_after / 2)
                if any(h.wants("machine.stale") for h in s.webhooks):
                    outbox.detect_stale(conn, now, s.stale_after)
            while outbox.fan_out(conn, s.webhooks, now, s.webhook_retry_for):
                pass
            if mono >= self._next_prune:
                self._next_prune = mono + PRUNE_EVERY
                outbox.expire(conn, now)
                outbox.prune(conn, now - timedelta(days=KEEP_DAYS))

    def _coordinate(self) -> None:
        self.housekeeping()
        self.stop.wait(POLL)

    # --- one receiver ---------------------------------------------------------------

    def deliver_one(self, hook: Webhook) -> bool:
        """Attempt the next due delivery to `hook`; False when none was due."""
        s = self.settings
        with self.store.transaction() as conn:
            claimed = outbox.claim(conn, hook.url, utcnow(), s.webhook_timeout + 1)
        if claimed is None:
            return False
        result = post(hook, claimed, s.webhook_timeout)
        now = utcnow()
        retry = backoff(
            claimed.attempts + 1, s.webhook_retry_initial, s.webhook_retry_max, self.rng
        )
        with self.store.transaction() as conn:
            state = outbox.record_attempt(
                conn,
                claimed.delivery_id,
                now,
                result.status,
                result.error,
                result.duration_ms,
                None if result.ok else now + timedelta(seconds=retry),
            )
        where = f"{claimed.event.event} #{claimed.event.id} to {display_url(hook.url)}"
        if result.ok:
            log.info("webhook %s: delivered (HTTP %s)", where, result.status)
        elif state == "failed":
            log.error(
                "webhook %s: gave up after %d attempts: %s",
                where,
                claimed.attempts + 1,
                result.error,
            )
        else:
            log.warning(
                "webhook %s: attempt %d failed (%s); retrying in %.1fs",
                where,
                claimed.attempts + 1,
                result.error,
                retry,
            )
        return True

    def _deliver(self, hook: Webhook) -> None:
        if not self.deliver_one(hook):
            self.stop.wait(POLL)


def start(settings: Settings, store: AnyStore, stop: threading.Event) -> list[threading.Thread]:
    return Sender(settings, store, stop).start()
