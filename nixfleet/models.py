"""Domain types: frozen dataclasses and str enums shared by store, API, CLI and agent."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from nixfleet.errors import ConflictError, FieldError, ValidationError

HOSTNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
STORE_PATH_RE = re.compile(r"^/nix/store/[0-9a-z]{32}-[^/]+$")
TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")


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


def isoformat(ts: datetime | None) -> str | None:
    """RFC 3339 UTC with a Z suffix, second precision is not enough for soak: keep micros."""
    if ts is None:
        return None
    return ts.astimezone(UTC).isoformat().replace("+00:00", "Z")


def parse_time(value: str | None) -> datetime | None:
    if value is None:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HealthResult:
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
    recent_reports: tuple[Report, ...] = field(default=())

    @property
    def sync(self) -> Sync:
        if self.desired_generation is None:
            return Sync.NO_DESIRED
        if self.current_generation == self.desired_generation:
            return Sync.IN_SYNC
        if self.failed_generation == self.desired_generation:
            return Sync.FAILED
        return Sync.UPDATING
