"""Disruption budgets: how many machines of a batch may start now (DESIGN §11). Pure.

Two kinds of limit hold a batch back:
- the rollout's `max_unavailable` (a count, or a percentage of its targets): its
  targeted machines that are deploying, unhealthy or stale at once;
- the fleet-wide `disruption_budgets` of the CP settings, `{tags, max_in_flight}`
  with all-of tag selectors, counting machines in flight across every rollout.

A machine is *unavailable* when `unavailable()` says so; stale machines count. The
store counts them set-based (nixfleet.store.policy, held to `unavailable` by a table
test) and `admit` decides from those counts: machines start in position order, one
after the other, as long as every limit that applies to each has room. The first
machine that does not fit stops the batch for this tick (head of line: the order
`rollout plan` shows is the order machines start in); it starts when a slot frees.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nixfleet.errors import FieldError
from nixfleet.models import MachineHealth
from nixfleet.policy import taggroups


@dataclass(frozen=True)
class MaxUnavailable:
    """A rollout's limit: a count, or a percentage of its targets (rounded down, ≥ 1)."""

    value: int
    percent: bool = False

    def allowed(self, targets: int) -> int:
        if not self.percent:
            return self.value
        return max(1, self.value * targets // 100)

    def __str__(self) -> str:
        return f"{self.value}%" if self.percent else str(self.value)

    @classmethod
    def parse(cls, value: int | str | None) -> MaxUnavailable | None:
        if value is None:
            return None
        if isinstance(value, str) and value.endswith("%"):
            return cls(int(value[:-1]), percent=True)
        return cls(int(value))


@dataclass(frozen=True)
class Budget:
    """A fleet-wide budget: machines carrying all `tags`, at most `max_in_flight` at once."""

    tags: tuple[str, ...]
    max_in_flight: int

    def matches(self, tags: Iterable[str]) -> bool:
        return taggroups.selects(self.tags, tags)

    def label(self) -> str:
        return f"disruption budget [{', '.join(self.tags)}] (max_in_flight {self.max_in_flight})"


@dataclass(frozen=True)
class MachineState:
    """What makes a machine unavailable, as the store reads it."""

    started: bool = False  # an active rollout wrote its generation to the machine
    health: MachineHealth = MachineHealth.PENDING  # its verdict in that rollout
    stale: bool = False
    failing: bool = False  # its latest report says failure or failing health checks
    rebooting: bool = False  # it holds a reboot lease


def unavailable(m: MachineState) -> bool:
    """Deploying (started, not yet healthy), unhealthy, failing, rebooting or stale."""
    if m.stale or m.rebooting or m.failing:
        return True
    return m.started and m.health is not MachineHealth.HEALTHY


@dataclass(frozen=True)
class Room:
    """One limit that applies to a batch: its label and how many more may start."""

    label: str
    free: int
    tags: tuple[str, ...] | None = None  # None: applies to every machine of the rollout

    def applies(self, tags: frozenset[str]) -> bool:
        return self.tags is None or taggroups.selects(self.tags, tags)


def rooms(
    max_unavailable: MaxUnavailable | None,
    targets: int,
    unavailable_targets: int,
    budgets: Sequence[Budget],
    in_flight: Sequence[int],
) -> list[Room]:
    """The limits of one rollout's tick, from the counts the store read."""
    out: list[Room] = []
    if max_unavailable is not None:
        allowed = max_unavailable.allowed(targets)
        out.append(
            Room(
                f"max_unavailable {max_unavailable} ({allowed} of {targets})",
                max(0, allowed - unavailable_targets),
            )
        )
    for b, n in zip(budgets, in_flight, strict=True):
        out.append(Room(b.label(), max(0, b.max_in_flight - n), b.tags))
    return out


@dataclass(frozen=True)
class Admission:
    count: int  # how many of the candidates, in order, start now
    held_by: str | None  # the limit that stopped the next one (None: all started)


def admit(candidates: Sequence[frozenset[str]], limits: Sequence[Room]) -> Admission:
    """How many candidates (their tags, in position order) start now, and what holds.

    Each started machine takes one slot of every limit that applies to it.
    """
    free = [r.free for r in limits]
    for i, tags in enumerate(candidates):
        for j, r in enumerate(limits):
            if r.applies(tags) and free[j] <= 0:
                return Admission(i, r.label)
        for j, r in enumerate(limits):
            if r.applies(tags):
                free[j] -= 1
    return Admission(len(candidates), None)


# --- documents ----------------------------------------------------------------------


def parse_budgets(items: Sequence[Mapping[str, Any]] | None) -> tuple[Budget, ...]:
    return tuple(
        Budget(tuple(sorted(set(i["tags"]))), int(i["max_in_flight"])) for i in items or ()
    )


def budget_errors(items: Any, field: str = "disruption_budgets") -> list[FieldError]:
    """Field errors of the settings' `disruption_budgets` (a list of {tags, max_in_flight})."""
    out: list[FieldError] = []
    if items is None:
        return out
    shape = "{tags: [...], max_in_flight: N}"
    for where, item in taggroups.entries(items, field, shape, ("tags", "max_in_flight"), out):
        message = "must be a non-empty list of tags, e.g. [db, prod]"
        taggroups.check_tags(out, where, item.get("tags"), message)
        taggroups.check_count(out, where, item, "max_in_flight")
    return out
