"""Wait for a local control plane's GET /ready (the NixOS unit's ExecStartPost probe)."""

from __future__ import annotations

import http.client
import time

from nixfleet.errors import UnreachableError

# A wildcard listener is reached through loopback (these are addresses to reach, not bind).
WILDCARD = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104
INTERVAL = 0.25


def probe(host: str, port: int, timeout: float) -> str | None:
    """None when /ready answers 200, else what was reached instead."""
    conn = http.client.HTTPConnection(WILDCARD.get(host, host), port, timeout=timeout)
    try:
        conn.request("GET", "/ready")
        answer = conn.getresponse()
        body = answer.read(2048).decode("utf-8", "replace")
        if answer.status == 200:
            return None
        return f"{answer.status} {body.strip()[:300]}"
    except (OSError, http.client.HTTPException) as e:
        return f"{type(e).__name__}: {e}"
    finally:
        conn.close()


def wait_until_ready(host: str, port: int, timeout: float) -> None:
    """Return once /ready is 200; UnreachableError naming the last answer after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        last = probe(host, port, max(0.1, min(5.0, left)))
        if last is None:
            return
        left = deadline - time.monotonic()
        if left <= 0:  # the whole timeout waited, the last probe at its end
            raise UnreachableError(
                f"control plane at {host}:{port} not ready within {timeout:g} s; last: {last}"
            )
        time.sleep(min(INTERVAL, left))
