"""Domain types: frozen dataclasses and str enums shared by store, API, CLI and agent."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import overload

from nixfleet import wire
from nixfleet.errors import ConflictError, FieldError, ValidationError

HOSTNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
STORE_PATH_RE = re.compile(r"^/nix/store/[0-9a-z]{32}-[A-Za-z0-9+._?=-]+\Z")
TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}\Z")


class Lifecycle(StrEnum):
    PENDING = "pending"
    PROVISIONING = "provisioning"
    ACTIVE = "active"
    MAINTENANCE = "maintenance"
    DECOMMISSIONED = "decommissioned"


# DESIGN §3: everything not listed here, including a state to itself, is refused.
TRANSITIONS: dict[Lifecycle, frozenset[Lifecycle]] = {
    Lifecycle.PENDING: frozenset(
        {Lifecycle.PROVISIONING, Lifecycle.ACTIVE, Lifecycle.DECOMMISSIONED}
    ),
    Lifecycle.PROVISIONING: frozenset({Lifecycle.PENDING, Lifecycle.ACTIVE}),
    Lifecycle.ACTIVE: frozenset({Lifecycle.MAINTENANCE, Lifecycle.DECOMMISSIONED}),
    Lifecycle.MAINTENANCE: frozenset({Lifecycle.ACTIVE, Lifecycle.DECOMMISSIONED}),
    Lifecycle.DECOMMISSIONED: frozenset(),
}


def check_transition(machine_id: str, current: Lifecycle, target: Lifecycle) -> None:
    """Raise ConflictError naming both states and the allowed targets."""
    allowed = TRANSITIONS[current]
    if target in allowed:
        return
    targets = ", ".join(sorted(allowed)) or "none (decommissioned is final)"
    raise ConflictError(
        f"machine {machine_id!r} cannot go from {current} to {target}; "
        f"allowed from {current}: {targets}"
    )


class SystemState(StrEnum):
    OK = "ok"
    DEGRADED = "degraded"
    ERROR = "error"
    UNKNOWN = "unknown"


class Sync(StrEnum):
    IN_SYNC = "in sync"
    UPDATING = "updating"
    FAILED = "failed"
    NO_DESIRED = "no desired"


def utcnow() -> datetime:
    return datetime.now(UTC)


# How every time is stored and sent: RFC 3339 UTC, always with microseconds (second
# precision is not enough for soak), fixed width, so string order is time order, in
# Python and in SQL alike.
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


@overload
def isoformat(ts: datetime) -> str: ...
@overload
def isoformat(ts: None) -> None: ...
@overload
def isoformat(ts: datetime | None) -> str | None: ...
def isoformat(ts: datetime | None) -> str | None:
    """A time in TIME_FORMAT (27 characters); None stays None."""
    if ts is None:
        return None
    return ts.astimezone(UTC).strftime(TIME_FORMAT)


def parse_time(value: str | None) -> datetime | None:
    if value is None:
        return None
    return time_of(value)


def time_of(value: str) -> datetime:
    """The instant an RFC 3339 text names (a stored time, or one an agent sent)."""
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def sync_of(desired: str | None, current: str | None, failed: str | None) -> Sync:
    """THE definition of sync (store.status.SYNC_SQL is held to it case by case)."""
    if desired is None:
        return Sync.NO_DESIRED
    if current == desired:
        return Sync.IN_SYNC
    if failed == desired:
        return Sync.FAILED
    return Sync.UPDATING


class Health(StrEnum):
    """The second axis beside sync (as Argo CD separates Sync from Health)."""

    HEALTHY = "healthy"
    FAILING = "failing"
    UNKNOWN = "unknown"


def health_of(health: HealthResult | None) -> Health:
    """THE definition of health (stored with each report: store.machines.record_report)."""
    if health is None:
        return Health.UNKNOWN
    return Health.HEALTHY if health.all_passed else Health.FAILING


def stale_cutoff(now: datetime, stale_after: int) -> datetime:
    """Machines last heard from before this instant are stale."""
    return now - timedelta(seconds=stale_after)


def is_stale(
    last_report_at: datetime | None,
    now: datetime,
    stale_after: int,
    lifecycle: Lifecycle | None = None,
) -> bool:
    """THE definition of stale (store.status.STALE_SQL is held to it case by case).

    A machine that never reported is not stale, only pending: stale means it went quiet.
    A decommissioned machine is never stale: it is meant to be quiet (DESIGN §3).
    """
    if lifecycle is Lifecycle.DECOMMISSIONED:
        return False
    return last_report_at is not None and last_report_at < stale_cutoff(now, stale_after)


def counts_in_sync_summary(lifecycle: Lifecycle) -> bool:
    """Decommissioned machines are listed but not counted in the sync summary (DESIGN §3)."""
    return lifecycle is not Lifecycle.DECOMMISSIONED


# A release id: rel- + 12 hex digits of a hash of its sorted entries (nixfleet.flake
# derives it; schemas/release.schema.json states the same pattern, held by a test).
RELEASE_ID_PREFIX = "rel-"
RELEASE_ID_DIGITS = 12
RELEASE_ID_RE = re.compile(rf"^{RELEASE_ID_PREFIX}[0-9a-f]{{{RELEASE_ID_DIGITS}}}$")


def release_id_from_digest(hexdigest: str) -> str:
    return RELEASE_ID_PREFIX + hexdigest[:RELEASE_ID_DIGITS]


def is_release_id(value: str) -> bool:
    return RELEASE_ID_RE.match(value) is not None


def validate_hostname(value: str, field_name: str = "id") -> str:
    if not isinstance(value, str) or not HOSTNAME_RE.match(value):
        raise ValidationError(
            f"invalid machine id {value!r}",
            errors=[
                FieldError(
                    field_name,
                    "must be a hostname: letters, digits, '.', '_' or '-', starting with a "
                    "letter or digit, at most 128 characters",
                )
            ],
        )
    return value


def validate_store_path(value: str, field_name: str = "store_path") -> str:
    if not isinstance(value, str) or not STORE_PATH_RE.match(value):
        raise ValidationError(
            f"invalid store path {value!r}",
            errors=[FieldError(field_name, "must look like /nix/store/<32 chars>-<name>")],
        )
    return value


@dataclass(frozen=True)
class HealthCheckResult:
    name: str
    kind: str
    passed: bool
    duration_ms: int = 0
    message: str = ""


@dataclass(frozen=True)
class HealthResult:
    all_passed: bool
    results: tuple[HealthCheckResult, ...] = ()

    def to_dict(self) -> wire.Health:
        """The DESIGN §4 wire shape (the inverse of from_dict)."""
        return {
            "all_passed": self.all_passed,
            "results": [
                {
                    "name": r.name,
                    "kind": r.kind,
                    "passed": r.passed,
                    "duration_ms": r.duration_ms,
                    "message": r.message,
                }
                for r in self.results
            ],
        }

    @classmethod
    def from_dict(cls, data: wire.Health) -> HealthResult:
        return cls(
            all_passed=bool(data["all_passed"]),
            results=tuple(
                HealthCheckResult(
                    name=r["name"],
                    kind=r["kind"],
                    passed=bool(r["passed"]),
                    duration_ms=int(r.get("duration_ms", 0)),
                    message=r.get("message", ""),
                )
                for r in data.get("results", [])
            ),
        )


@dataclass(frozen=True)
class Report:
    """What an agent says about itself on every poll (DESIGN §4 report body)."""

    machine_id: str
    received_at: datetime
    current_generation: str
    success: bool = True
    message: str = ""
    attempted_generation: str | None = None
    health: HealthResult | None = None
    tags: tuple[str, ...] | None = None
    agent_version: str | None = None
    uptime_seconds: int | None = None
    output: str | None = None  # the failed switch's output tail (agent.output), sent once
    needs_reboot: bool | None = None  # DESIGN §11: booted kernel/initrd/modules differ
    booted_generation: str | None = None

    @property
    def system_state(self) -> SystemState:
        if not self.success:
            return SystemState.ERROR
        if self.health is not None and not self.health.all_passed:
            return SystemState.DEGRADED
        return SystemState.OK if self.health is not None else SystemState.UNKNOWN


@dataclass(frozen=True)
class Machine:
    id: str
    lifecycle: Lifecycle
    registered_at: datetime
    tags: tuple[str, ...] = ()
    operator_tags: tuple[str, ...] = ()
    agent_tags: tuple[str, ...] = ()
    current_generation: str | None = None
    desired_generation: str | None = None
    desired_cache_url: str | None = None
    desired_source: str | None = None
    last_report_at: datetime | None = None
    agent_version: str | None = None
    system_state: SystemState = SystemState.UNKNOWN
    last_success: bool | None = None
    last_message: str | None = None
    failed_generation: str | None = None
    health: HealthResult | None = None
    retry_requested_at: datetime | None = None
    uptime_seconds: int | None = None  # as of the last report
    failed_output: str | None = None  # of the failed generation's switch; read by get() only
    needs_reboot: bool | None = None
    booted_generation: str | None = None

    @property
    def sync(self) -> Sync:
        return sync_of(self.desired_generation, self.current_generation, self.failed_generation)

    def stale(self, now: datetime, stale_after: int) -> bool:
        return is_stale(self.last_report_at, now, stale_after, self.lifecycle)


# --- releases and rollouts ----------------------------------------------------------------


@dataclass(frozen=True)
class ReleaseEntry:
    """One host's system closure in a release."""

    hostname: str
    store_path: str
    platform: str
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Release:
    """An immutable manifest; its id is derived from its entries (see nixfleet.flake)."""

    id: str
    entries: tuple[ReleaseEntry, ...]
    flake_ref: str | None = None
    flake_rev: str | None = None
    cache_url: str | None = None
    created_at: datetime | None = None
    created_by: str | None = None

    def entry(self, hostname: str) -> ReleaseEntry | None:
        return next((e for e in self.entries if e.hostname == hostname), None)


class Strategy(StrEnum):
    CANARY = "canary"
    STAGED = "staged"
    ALL_AT_ONCE = "all-at-once"


class OnFailure(StrEnum):
    PAUSE = "pause"
    REVERT = "revert"


class RolloutStatus(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def active(self) -> bool:
        """Active rollouts own their machines: no other rollout may target them."""
        return self in (RolloutStatus.RUNNING, RolloutStatus.PAUSED)


class BatchStatus(StrEnum):
    PENDING = "pending"
    DEPLOYING = "deploying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class MachineHealth(StrEnum):
    PENDING = "pending"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True)
class Threshold:
    """A batch's failure budget: a count, or a percentage of the batch (rounded down)."""

    value: int
    percent: bool = False

    def allowed(self, batch_size: int) -> int:
        return (self.value * batch_size) // 100 if self.percent else self.value

    def __str__(self) -> str:
        return f"{self.value}%" if self.percent else str(self.value)


@dataclass(frozen=True)
class BatchSize:
    """A batch size from a rollout file: a count, or a percentage of all targets."""

    value: int
    percent: bool = False

    def __str__(self) -> str:
        return f"{self.value}%" if self.percent else str(self.value)


@dataclass(frozen=True)
class RolloutSpec:
    """A validated rollout document (DESIGN §3 "Rollout files")."""

    name: str
    release: str
    strategy: Strategy
    target_tags: tuple[str, ...] = ()
    target_hosts: tuple[str, ...] = ()
    batches: tuple[BatchSize, ...] = ()
    failure_threshold: Threshold = Threshold(0)
    on_failure: OnFailure = OnFailure.PAUSE
    health_timeout: int = 300
    soak: int = 0
    confirm_timeout: int | None = None  # seconds (agent.confirm); None: the agent's default
    skip_lifecycle: tuple[Lifecycle, ...] = ()


@dataclass(frozen=True)
class Batch:
    index: int
    status: BatchStatus
    hosts: tuple[str, ...] = ()
    started_at: datetime | None = None
    finished_at: datetime | None = None


@dataclass(frozen=True)
class Rollout:
    id: str
    name: str
    release_id: str
    status: RolloutStatus
    spec: RolloutSpec
    created_at: datetime
    updated_at: datetime
    batches: tuple[Batch, ...] = ()
