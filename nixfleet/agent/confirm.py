"""The confirm window: a switch that cuts the machine off from the CP rolls itself back.

The rule (docs/agent.md): with a confirm timeout (the rollout's `confirm_timeout`,
passed in the report answer, else the agent's own `confirm_timeout`), a switch made
right after a successful report is *armed*: unless a report completes within the
timeout after the switch, the agent switches back to the previous generation and
reports `rolled back: no confirmation from the control plane within …` once it can.
A report that completes disarms it for good, so an outage that starts after the
confirmation never causes a rollback. The armed window is kept in
`<state_dir>/confirm.json` with its deadline on this machine's own clock, so an
agent restarted inside the window keeps waiting for the same deadline.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from nixfleet.errors import NixfleetError

log = logging.getLogger(__name__)

CONFIRM_FILE = "confirm.json"
RETRY = 1.0  # seconds between report attempts inside the window


@dataclass(frozen=True)
class Armed:
    generation: str
    previous: str
    timeout: float
    deadline: float  # time.time() on this machine


def describe(seconds: float) -> str:
    s = round(seconds)
    if s % 3600 == 0:
        return f"{s // 3600}h"
    if s % 60 == 0:
        return f"{s // 60}m"
    return f"{s}s"


def reason(timeout: float) -> str:
    return f"no confirmation from the control plane within {describe(timeout)}"


class Window:
    """The armed window of one machine, persisted in its state dir."""

    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / CONFIRM_FILE

    def load(self) -> Armed | None:
        try:
            return Armed(**json.loads(self.path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as e:
            log.error("ignoring unreadable confirm window %s: %s", self.path, e)
            return None

    def arm(self, generation: str, previous: str, timeout: float) -> Armed:
        armed = Armed(generation, previous, timeout, time.time() + timeout)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=".confirm.", dir=self.path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(armed), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        log.info(
            "confirm window armed: a report must complete within %s, else back to %s",
            describe(timeout),
            previous,
        )
        return armed

    def disarm(self) -> None:
        self.path.unlink(missing_ok=True)

    def wait(self, armed: Armed, report: Callable[[], object], stop: Callable[[], bool]) -> bool:
        """Try `report` until one completes (True) or the deadline passes (False).

        Any answer of the CP counts only if `report` returns; every error is a report
        that did not complete. `stop` ends the wait early (SIGTERM): the window stays
        armed for the next agent process.
        """
        while True:
            try:
                report()
            except NixfleetError as e:
                left = armed.deadline - time.time()
                if left <= 0:
                    return False
                log.warning(
                    "no confirmation from the control plane yet (%s); %.0fs left in the window",
                    e.detail,
                    left,
                )
                if stop() or _sleep(min(RETRY, left), stop):
                    raise
                continue
            self.disarm()
            log.info("switch confirmed by the control plane")
            return True


def _sleep(seconds: float, stop: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if stop():
            return True
        time.sleep(min(0.1, deadline - time.monotonic()))
    return stop()
