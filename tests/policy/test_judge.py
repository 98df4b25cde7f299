"""The health gate's §11 rules (rollout.judge): a machine's own start, reboots."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from nixfleet import rollout
from nixfleet.models import MachineHealth
from nixfleet.rollout import MachineFacts

T0 = datetime(2026, 12, 7, 10, 0, tzinfo=UTC)
GEN = "/nix/store/" + "n" * 32 + "-nixos-system-db"
P, H, U = MachineHealth.PENDING, MachineHealth.HEALTHY, MachineHealth.UNHEALTHY


def at(s: float) -> datetime:
    return T0 + timedelta(seconds=s)


def good(**kw: object) -> MachineFacts:
    base: dict[str, object] = {
        "last_report_at": at(5),
        "current_generation": GEN,
        "last_success": True,
    }
    base.update(kw)
    return MachineFacts("db-1", GEN, **base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("f", "now", "reboot", "health", "reason"),
    [
        (good(), 10, True, H, "healthy"),
        (good(needs_reboot=True), 10, False, H, "healthy"),  # reboot: never
        (good(needs_reboot=True), 10, True, P, "needs a reboot"),
        (good(needs_reboot=True), 300, True, U, "timed out after 5m (needs a reboot)"),
        (good(rebooting=True, needs_reboot=True), 10, True, P, "rebooting"),
        (good(rebooting=True, needs_reboot=False), 10, True, P, "rebooting"),  # lease still held
        (good(needs_reboot=False), 10, True, H, "healthy"),
        # Given its generation 100 s after the batch started: its own 5 minutes.
        (
            MachineFacts("db-1", GEN, given_at=at(100)),
            300,
            False,
            P,
            "no report since the batch started",
        ),
        (
            MachineFacts("db-1", GEN, given_at=at(100)),
            400,
            False,
            U,
            "timed out after 5m (no report since the batch started)",
        ),
        (good(given_at=at(10)), 20, False, P, "no report since the batch started"),  # report before
    ],
)
def test_judge_reboot_and_own_start(
    f: MachineFacts, now: float, reboot: bool, health: MachineHealth, reason: str
) -> None:
    v = rollout.judge(f, T0, at(now), 300, 0, reboot)
    assert (v.health, v.reason) == (health, reason)
