"""A machine's history: the changes, never the heartbeats (DESIGN §3 History).

Pure: what a report changed, judged against what the store held before it. The
store (nixfleet.store.history) writes and reads the events; the desired generation's
changes are written by each writer of it (store.history.add_desired).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from nixfleet.models import HealthResult, Report, health_of


class EventKind(StrEnum):
    GENERATION = "generation"  # the machine switched generation (from -> to)
    DEPLOYMENT_FAILED = "deployment-failed"  # a deployment failed, the machine kept running
    ROLLED_BACK = "rolled-back"  # a deployment failed and the agent rolled back
    HEALTH = "health"  # health turned failing/passing, or other checks fail now
    TAGS = "tags"  # tags added/removed (agent-sourced or operator-sourced)
    LIFECYCLE = "lifecycle"  # lifecycle state changed (from -> to)
    DESIRED = "desired"  # desired generation changed (from -> to), by rollout or operator
    REBOOT_NEEDED = "reboot-needed"  # the running generation needs a reboot (DESIGN §11)
    REBOOTED = "rebooted"  # the machine booted another generation (booted: from -> to)


# Kinds whose `previous` is the `generation` of the machine's event of the same kind
# before it (derived on read, so each store path is stored once per change).
CHAINED = frozenset({EventKind.GENERATION, EventKind.DESIRED})


@dataclass(frozen=True)
class Event:
    """One change: when, what, who or what caused it (source), and its particulars."""

    machine_id: str
    at: datetime
    kind: EventKind
    source: str
    generation: str | None = None  # to (generation, desired) or the failed one
    previous: str | None = None  # from, for CHAINED kinds (None: unknown or none)
    detail: Mapping[str, Any] = field(default_factory=dict)
    id: int = 0


@dataclass(frozen=True)
class Prior:
    """What the machines row said before this report."""

    current_generation: str | None
    failed_generation: str | None
    last_success: bool | None
    health: HealthResult | None
    needs_reboot: bool | None = None
    booted_generation: str | None = None


def _checks(health: HealthResult | None) -> dict[str, bool]:
    return {} if health is None else {r.name: r.passed for r in health.results}


def health_status(health: HealthResult | None) -> str:
    """The health axis of one report: healthy, failing, or unknown (no checks reported)."""
    return health_of(health).value  # the one definition, in models


def report_events(prior: Prior, report: Report) -> list[Event]:
    """The changes one report makes; [] for a heartbeat.

    A failure is an event when it is new (another generation failed, or the agent
    had reported success since); the agent repeats it on every poll until the
    desired generation changes, and those repeats are heartbeats.
    """
    out: list[Event] = []
    at, mid = report.received_at, report.machine_id
    if report.current_generation != prior.current_generation:
        out.append(
            Event(
                mid,
                at,
                EventKind.GENERATION,
                "agent",
                report.current_generation,
                prior.current_generation,
            )
        )
    if not report.success:
        failed = report.attempted_generation
        new = prior.last_success is not False or (
            failed is not None and failed != prior.failed_generation
        )
        if new:
            rolled_back = (
                failed is not None
                and report.current_generation != failed
                and (report.message.startswith("rolled back"))
            )
            kind = EventKind.ROLLED_BACK if rolled_back else EventKind.DEPLOYMENT_FAILED
            out.append(Event(mid, at, kind, "agent", failed, detail={"reason": report.message}))
    health = _health_event(prior.health, report)
    if health is not None:
        out.append(health)
    out.extend(_reboot_events(prior, report))
    return out


def _reboot_events(prior: Prior, report: Report) -> list[Event]:
    """Reboot needed: the agent says so and did not before (it says so on every poll
    until the machine reboots). Rebooted: the booted generation it reports changed
    (the first one an agent reports is no reboot anyone saw)."""
    out: list[Event] = []
    at, mid = report.received_at, report.machine_id
    booted = report.booted_generation
    before = prior.booted_generation
    if booted is not None and before is not None and booted != before:
        out.append(Event(mid, at, EventKind.REBOOTED, "agent", booted, detail={"previous": before}))
    if report.needs_reboot and prior.needs_reboot is not True:
        detail = {"booted": booted} if booted is not None else {}
        out.append(
            Event(
                mid, at, EventKind.REBOOT_NEEDED, "agent", report.current_generation, detail=detail
            )
        )
    return out


def _health_event(before: HealthResult | None, report: Report) -> Event | None:
    after = report.health
    old_status, new_status = health_status(before), health_status(after)
    old_failing = {n for n, ok in _checks(before).items() if not ok}
    new_failing = {n for n, ok in _checks(after).items() if not ok}
    if old_status == new_status and old_failing == new_failing:
        return None
    if before is None and new_status == "healthy":
        # The first checks to report, all passing: nothing turned, nothing to tell.
        return None
    detail = {
        "status": new_status,
        "previous": old_status,
        "failing": sorted(new_failing),
        "newly_failing": sorted(new_failing - old_failing),
        "recovered": sorted(old_failing - new_failing),
    }
    return Event(report.machine_id, report.received_at, EventKind.HEALTH, "agent", detail=detail)
