"""Disruption budgets, reboot leases and the reboot-needed rule, from tables."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from nixfleet import policy
from nixfleet.models import MachineHealth
from nixfleet.policy import budgets, leases, reboot
from nixfleet.policy.budgets import Budget, MachineState, MaxUnavailable, Room

T0 = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)
DB = Budget(("db",), 1)
PROD = Budget(("prod",), 3)


@pytest.mark.parametrize(
    ("limit", "targets", "allowed"),
    [
        (MaxUnavailable(2), 100, 2),
        (MaxUnavailable(10, percent=True), 100, 10),
        (MaxUnavailable(10, percent=True), 95, 9),  # rounded down
        (MaxUnavailable(10, percent=True), 5, 1),  # but at least one
        (MaxUnavailable(100, percent=True), 7, 7),
    ],
)
def test_max_unavailable(limit: MaxUnavailable, targets: int, allowed: int) -> None:
    assert limit.allowed(targets) == allowed


def test_max_unavailable_parses_counts_and_percentages() -> None:
    assert MaxUnavailable.parse(None) is None
    assert MaxUnavailable.parse(3) == MaxUnavailable(3)
    assert MaxUnavailable.parse("25%") == MaxUnavailable(25, percent=True)
    assert str(MaxUnavailable(25, percent=True)) == "25%"


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (MachineState(), False),  # not started: available
        (MachineState(started=True), True),  # deploying
        (MachineState(started=True, health=MachineHealth.HEALTHY), False),
        (MachineState(started=True, health=MachineHealth.UNHEALTHY), True),
        (MachineState(health=MachineHealth.UNHEALTHY), False),  # verdict of a batch not started
        (MachineState(stale=True), True),  # stale counts as unavailable
        (MachineState(started=True, health=MachineHealth.HEALTHY, stale=True), True),
        (MachineState(failing=True), True),
        (MachineState(rebooting=True, started=True, health=MachineHealth.HEALTHY), True),
    ],
)
def test_unavailable(state: MachineState, expected: bool) -> None:
    assert budgets.unavailable(state) is expected


def tags(*names: str) -> frozenset[str]:
    return frozenset(names)


ROOMS_DB1 = budgets.rooms(None, 10, 0, [DB], [0])


@pytest.mark.parametrize(
    ("candidates", "limits", "count", "held_by"),
    [
        ([tags("web")] * 3, [], 3, None),  # no limits: everything starts
        (
            [tags("web")] * 3,
            budgets.rooms(MaxUnavailable(2), 10, 0, [], []),
            2,
            "max_unavailable 2",
        ),
        (
            [tags("web")] * 3,
            budgets.rooms(MaxUnavailable(2), 10, 2, [], []),
            0,
            "max_unavailable 2",
        ),
        (
            [tags("web")] * 3,
            budgets.rooms(MaxUnavailable(5), 10, 9, [], []),
            0,
            "max_unavailable 5",
        ),
        ([tags("db"), tags("db")], ROOMS_DB1, 1, "disruption budget [db]"),
        ([tags("web"), tags("db"), tags("web")], ROOMS_DB1, 3, None),
        ([tags("db"), tags("web"), tags("db")], ROOMS_DB1, 2, "disruption budget [db]"),
        ([tags("db")], budgets.rooms(None, 10, 0, [DB], [1]), 0, "disruption budget [db]"),
        # all-of selector: a machine tagged only "prod" is not in the [db] budget
        (
            [tags("prod"), tags("prod", "db"), tags("prod", "db")],
            budgets.rooms(None, 10, 0, [DB, PROD], [0, 1]),
            2,
            "disruption budget [db]",
        ),
        (
            [tags("prod")] * 4,
            budgets.rooms(None, 10, 0, [DB, PROD], [0, 1]),
            2,
            "disruption budget [prod]",
        ),
    ],
)
def test_admit(
    candidates: list[frozenset[str]], limits: list[Room], count: int, held_by: str | None
) -> None:
    got = budgets.admit(candidates, limits)
    assert got.count == count
    if held_by is None:
        assert got.held_by is None
    else:
        assert got.held_by is not None and got.held_by.startswith(held_by)


def test_budgets_parse_and_refuse_with_field_names() -> None:
    assert budgets.parse_budgets([{"tags": ["db", "db"], "max_in_flight": 1}]) == (
        Budget(("db",), 1),
    )
    assert budgets.budget_errors(None) == []
    bad: Any = [
        {"tags": [], "max_in_flight": 1},
        {"tags": ["db"], "max_in_flight": 0},
        {"tags": ["db"], "max_in_flight": True, "extra": 1},
        "x",
    ]
    assert [e.field for e in budgets.budget_errors(bad)] == [
        "disruption_budgets[0].tags",
        "disruption_budgets[1].max_in_flight",
        "disruption_budgets[2].extra",
        "disruption_budgets[2].max_in_flight",
        "disruption_budgets[3]",
    ]
    assert [e.field for e in budgets.budget_errors({"tags": ["db"]})] == ["disruption_budgets"]


# --- reboot leases ----------------------------------------------------------------------

GROUPS = leases.parse_groups([{"tags": ["db"], "slots": 1}, {"tags": ["web"], "slots": 2}])
DBG, WEBG = GROUPS


def lease(group: str, machine: str, expires_in: int = 600) -> leases.Lease:
    return leases.Lease(group, machine, T0, T0 + timedelta(seconds=expires_in))


@pytest.mark.parametrize(
    ("machine_tags", "names"),
    [
        (["db", "prod"], ["db"]),
        (["db", "web"], ["db", "web"]),
        (["cache"], ["default"]),
        ([], ["default"]),
    ],
)
def test_groups_for(machine_tags: list[str], names: list[str]) -> None:
    assert [g.name for g in leases.groups_for(machine_tags, GROUPS, 2)] == names


@pytest.mark.parametrize(
    ("machine", "mine", "held", "granted", "new", "full"),
    [
        ("db-1", [DBG], [], True, 1, ()),
        ("db-1", [DBG], [lease("db", "db-1")], True, 0, ()),  # recursive: same lease back
        ("db-2", [DBG], [lease("db", "db-1")], False, 0, ("db",)),
        ("db-2", [DBG], [lease("db", "db-1", expires_in=0)], True, 1, ()),  # expired frees
        ("web-3", [WEBG], [lease("web", "web-1"), lease("web", "web-2")], False, 0, ("web",)),
        ("web-2", [WEBG], [lease("web", "web-1")], True, 1, ()),
        # all or nothing: db full -> no web slot taken either
        ("dw-1", [DBG, WEBG], [lease("db", "db-1")], False, 0, ("db",)),
        ("dw-1", [DBG, WEBG], [lease("db", "dw-1")], True, 1, ()),  # half held: takes the rest
    ],
)
def test_take(
    machine: str,
    mine: list[leases.Group],
    held: list[leases.Lease],
    granted: bool,
    new: int,
    full: tuple[str, ...],
) -> None:
    got = leases.take(machine, mine, held, T0, 900)
    assert got.granted is granted
    assert len(got.new) == new
    assert got.full == full
    if granted:
        assert {x.group for x in got.leases} == {g.name for g in mine}
        assert all(x.machine_id == machine for x in got.leases)
        assert all(x.expires_at == T0 + timedelta(seconds=900) for x in got.new)
    else:
        assert got.holders is not None and all(got.holders[g] for g in full)


def test_recursive_take_keeps_the_original_expiry() -> None:
    first = leases.take("db-1", [DBG], [], T0, 900)
    again = leases.take("db-1", [DBG], list(first.leases), T0 + timedelta(seconds=60), 900)
    assert again.granted and again.new == () and again.leases == first.leases


def test_release_is_owned_and_idempotent() -> None:
    held = [lease("db", "db-1"), lease("web", "web-1")]
    assert leases.release("db-1", held) == [held[0]]
    assert leases.release("db-9", held) == []  # not a holder: nothing to do, not an error


def test_expired_and_live_split_at_the_expiry() -> None:
    held = [lease("db", "a", 0), lease("db", "b", 1)]
    assert [x.machine_id for x in leases.expired(held, T0)] == ["a"]
    assert [x.machine_id for x in leases.live(held, T0)] == ["b"]


def test_group_errors() -> None:
    bad: Any = [
        {"tags": ["db"], "slots": 0},
        {"tags": ["db"], "slots": 1},
        {"tags": ["x"], "slots": 1, "name": "default"},
        {"slots": 1},
    ]
    assert [e.field for e in leases.group_errors(bad)] == [
        "reboot_groups[0].slots",
        "reboot_groups[1].name",
        "reboot_groups[2].name",
        "reboot_groups[3].tags",
    ]


# --- reboot needed ----------------------------------------------------------------------

K1 = {
    "initrd": "/nix/store/a-initrd",
    "kernel": "/nix/store/k1/bzImage",
    "kernel-modules": "/nix/store/m1",
}


@pytest.mark.parametrize(
    ("booted", "current", "needed", "changed"),
    [
        (K1, K1, False, []),
        (K1, {**K1, "kernel": "/nix/store/k2/bzImage"}, True, ["kernel"]),
        (K1, {**K1, "initrd": "/nix/store/b-initrd"}, True, ["initrd"]),
        (K1, {**K1, "kernel-modules": "/nix/store/m2"}, True, ["kernel-modules"]),
        ({}, {}, False, []),  # a container: no boot links on either side
        (K1, {}, True, ["initrd", "kernel", "kernel-modules"]),
    ],
)
def test_needs_reboot(
    booted: dict[str, str], current: dict[str, str], needed: bool, changed: list[str]
) -> None:
    assert reboot.needs_reboot(booted, current) is needed
    assert reboot.changed_links(booted, current) == changed


def test_rollout_policy_from_a_document() -> None:
    doc = {
        "max_unavailable": "10%",
        "windows": [{"days": ["mon"], "start": "09:00", "end": "16:00", "timezone": "UTC"}],
        "reboot": "when-needed",
    }
    p = policy.from_document(doc)
    assert p.max_unavailable == MaxUnavailable(10, percent=True)
    assert p.windows[0].days == frozenset({0})
    assert p.reboot is reboot.RebootPolicy.WHEN_NEEDED
    assert policy.from_document({}) == policy.RolloutPolicy()
    assert not policy.RolloutPolicy().active
