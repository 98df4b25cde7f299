"""The agent's durable memory in `<state_dir>/state.json`.

It survives the agent being restarted by the very switch it started: an activation is
recorded as in progress BEFORE the profile changes and its outcome after, and
generations that failed here are remembered so they are not re-applied on every poll.
Writes are atomic (temp file, fsync, rename) so a crash never leaves half a file.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TypedDict

from nixfleet.models import isoformat, parse_time, utcnow
from nixfleet.wire import JSONObject

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
MAX_FAILURES = 32


@dataclass(frozen=True)
class InProgress:
    """An activation that started; `previous` is what ran before (None: nothing)."""

    generation: str
    previous: str | None
    profile_previous: str | None
    started_at: str
    unit: str | None = None


@dataclass(frozen=True)
class Outcome:
    """How the last activation attempt ended."""

    generation: str
    success: bool
    message: str
    at: str
    previous: str | None = None
    output: str | None = None  # a failed switch's output tail (agent.output), for reports
    output_reported: bool = False  # the CP has it: later reports leave it out


@dataclass(frozen=True)
class Failure:
    at: str
    message: str

    @property
    def time(self) -> datetime:
        ts = parse_time(self.at)
        assert ts is not None
        return ts


class StateFile(TypedDict):
    """state.json as written (version 1); `from_dict` also reads older, partial files."""

    version: int
    in_progress: JSONObject | None  # an InProgress
    last_outcome: JSONObject | None  # an Outcome
    failures: dict[str, JSONObject]  # generation -> a Failure
    last_desired: str | None
    retries: dict[str, str | None]


@dataclass(frozen=True)
class AgentState:
    in_progress: InProgress | None = None
    last_outcome: Outcome | None = None
    failures: dict[str, Failure] = field(default_factory=dict)
    last_desired: str | None = None
    # generation -> the CP's retry_requested_at when this agent last tried it: a retry
    # request is new when it differs, whatever either clock says (DESIGN §9 Time).
    retries: dict[str, str | None] = field(default_factory=dict)

    def to_dict(self) -> StateFile:
        return {
            "version": 1,
            "in_progress": asdict(self.in_progress) if self.in_progress else None,
            "last_outcome": asdict(self.last_outcome) if self.last_outcome else None,
            "failures": {k: asdict(v) for k, v in self.failures.items()},
            "last_desired": self.last_desired,
            "retries": dict(self.retries),
        }

    @classmethod
    def from_dict(cls, data: JSONObject) -> AgentState:
        ip = data.get("in_progress")
        lo = data.get("last_outcome")
        return cls(
            in_progress=InProgress(**ip) if ip else None,
            last_outcome=Outcome(**lo) if lo else None,
            failures={k: Failure(**v) for k, v in (data.get("failures") or {}).items()},
            last_desired=data.get("last_desired"),
            retries=dict(data.get("retries") or {}),
        )

    def with_attempt(self, generation: str, retry_requested_at: str | None) -> AgentState:
        """Remember the retry request an attempt was made under (kept for failures only)."""
        retries = {k: v for k, v in self.retries.items() if k in self.failures}
        retries[generation] = retry_requested_at
        return replace(self, retries=retries)

    def with_failure(self, generation: str, message: str, at: str | None = None) -> AgentState:
        """Remember a failed generation (newest MAX_FAILURES kept)."""
        failures = {k: v for k, v in self.failures.items() if k != generation}
        failures[generation] = Failure(at or now(), message)
        keep = sorted(failures.items(), key=lambda kv: kv[1].at)[-MAX_FAILURES:]
        return replace(self, failures=dict(keep))


def now() -> str:
    ts = isoformat(utcnow())
    assert ts is not None
    return ts


class StateStore:
    """Load and atomically save AgentState in a directory."""

    def __init__(self, state_dir: str | Path) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / STATE_FILE

    def load(self) -> AgentState:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return AgentState()
        except (OSError, ValueError) as e:
            # A corrupt state file must not wedge the agent; start afresh but say so.
            log.error("ignoring unreadable state file %s: %s", self.path, e)
            return AgentState()
        try:
            return AgentState.from_dict(data)
        except (TypeError, KeyError) as e:
            log.error("ignoring state file %s with unexpected content: %s", self.path, e)
            return AgentState()

    def save(self, state: AgentState) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=".state.", dir=self.dir)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(state.to_dict(), f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
