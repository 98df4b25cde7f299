"""What a heartbeat is (DESIGN §3 History, §8): pure, no I/O.

A report is a heartbeat when storing it (store.machines.record_report) would change
nothing the control plane knows about the machine but the time it was heard from
and its uptime: the same generation, outcome and message, the same health checks
with the same results and messages (only their durations may differ), the same
agent tags, agent version, reboot need and booted generation, no switch output to
keep, no failure to record or clear and no lifecycle promotion. Such a report is
answered from memory (nixfleet.api.report_cache) and its last-seen time written
in batches; every other report takes the full transaction.

`Known` is what the store holds for a machine, reduced to what this decision
needs (store.report_cache loads it). The decision is held to record_report by
tests/test_heartbeat.py: generated prior states and reports, each stored for real;
a report judged a heartbeat writes no event and changes no column but
last_report_at and uptime_seconds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nixfleet.models import Lifecycle, SystemState

# Lifecycles whose reports change nothing about the lifecycle (pending and
# provisioning are promoted by the first report; decommissioned ones are refused).
STEADY = frozenset({Lifecycle.ACTIVE.value, Lifecycle.MAINTENANCE.value})

# A health result without durations: (all_passed, ((name, kind, passed, message), ...)).
HealthKey = tuple[bool, tuple[tuple[str, str, bool, str], ...]]


def health_key(health: Mapping[str, Any] | None) -> HealthKey | None:
    """A health result (the wire/stored shape) with the durations left out."""
    if health is None:
        return None
    return (
        bool(health["all_passed"]),
        tuple(
            (r["name"], r["kind"], bool(r["passed"]), r.get("message", ""))
            for r in health.get("results", ())
        ),
    )


@dataclass(frozen=True, slots=True)
class Known:
    """What the machines row (and its agent tags) say, as far as a heartbeat matters."""

    lifecycle: str
    current_generation: str | None
    last_success: bool | None
    last_message: str | None
    failed_generation: str | None
    health: HealthKey | None
    system_state: str
    agent_version: str | None
    needs_reboot: bool | None
    booted_generation: str | None
    agent_tags: frozenset[str]


def system_state(success: bool, health: HealthKey | None) -> str:
    """models.Report.system_state, for a body (held to it by tests/test_heartbeat.py)."""
    if not success:
        return SystemState.ERROR.value
    if health is not None and not health[0]:
        return SystemState.DEGRADED.value
    return (SystemState.OK if health is not None else SystemState.UNKNOWN).value


def is_heartbeat(known: Known, body: Mapping[str, Any]) -> bool:
    """Whether storing this validated report body would change only last-seen and uptime."""
    if known.lifecycle not in STEADY:
        return False
    current = body["current_generation"]
    success = body.get("success", True)
    if current != known.current_generation or success is not known.last_success:
        return False
    if body.get("message", "") != known.last_message:
        return False
    if success or body.get("attempted_generation") is None:
        # Nothing failed: a failed generation is kept, unless the machine now runs it.
        if known.failed_generation is not None and known.failed_generation == current:
            return False
    elif (
        body["attempted_generation"] != known.failed_generation
        or body["attempted_generation"] == current
        or body.get("output") is not None
    ):
        return False  # a new failure, its switch output to keep, or one to clear
    health = health_key(body.get("health"))
    if health != known.health or system_state(success, health) != known.system_state:
        return False
    if body.get("needs_reboot") != known.needs_reboot:
        return False
    for field, have in (
        ("agent_version", known.agent_version),
        ("booted_generation", known.booted_generation),
    ):
        value = body.get(field)
        if value is not None and value != have:  # absent: the stored one is kept
            return False
    tags: Sequence[str] | None = body.get("tags")
    return tags is None or frozenset(tags) == known.agent_tags
