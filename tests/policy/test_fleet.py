"""The fleet-wide policy settings: parsed into pure data, every bad value named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from nixfleet import settings
from nixfleet.errors import ValidationError
from nixfleet.policy import fleet, windows
from nixfleet.policy.budgets import Budget

NIGHT = {"start": "22:00", "end": "04:00", "timezone": "Europe/Berlin"}
OFFICE = {"days": ["mon"], "start": "09:00", "end": "16:00"}


def test_settings_file_gives_the_fleet_policy(tmp_path: Path) -> None:
    f = tmp_path / "settings.json"
    f.write_text(
        json.dumps(
            {
                "disruption_budgets": [{"tags": ["db"], "max_in_flight": 1}],
                "default_windows": [
                    {"tags": ["db"], "windows": [NIGHT]},
                    {"tags": [], "windows": [OFFICE]},
                ],
                "reboot_groups": [{"tags": ["db"], "slots": 1}],
                "reboot_slots": 3,
                "reboot_timeout": 1200,
            }
        )
    )
    p = settings.load(f).fleet_policy
    assert p.budgets == (Budget(("db",), 1),)
    assert [g.name for g in p.reboot_groups] == ["db"]
    assert (p.reboot_slots, p.reboot_timeout) == (3, 1200)
    # A rollout's own windows win; else the first default whose tags its target has.
    own = p.windows_for(windows.parse([OFFICE]), ["db"])
    assert [w.timezone for w in own] == ["UTC"]
    assert [w.timezone for w in p.windows_for((), ["db", "prod"])] == ["Europe/Berlin"]
    assert [w.start for w in p.windows_for((), ["web"])] == [9 * 60]
    assert settings.load().fleet_policy == fleet.FleetPolicy()


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (
            {"disruption_budgets": [{"tags": ["db"], "max_in_flight": 0}]},
            "disruption_budgets[0].max_in_flight",
        ),
        ({"disruption_budgets": {"tags": ["db"]}}, "disruption_budgets"),
        ({"default_windows": [{"tags": ["db"], "windows": []}]}, "default_windows[0].windows"),
        (
            {"default_windows": [{"windows": [{"start": "9", "end": "10:00"}]}]},
            "default_windows[0].windows[0].start",
        ),
        (
            {"default_windows": [{"windows": [{**NIGHT, "timezone": "Mars/Base"}]}]},
            "default_windows[0].windows[0].timezone",
        ),
        ({"default_windows": [{"windows": [NIGHT], "when": 1}]}, "default_windows[0].when"),
        ({"reboot_groups": [{"tags": ["db"], "slots": -1}]}, "reboot_groups[0].slots"),
        ({"reboot_slots": 0}, "reboot_slots"),
        ({"reboot_timeout": 1.5}, "reboot_timeout"),
    ],
)
def test_bad_policy_settings_name_the_field(
    tmp_path: Path, data: dict[str, Any], field: str
) -> None:
    f = tmp_path / "settings.json"
    f.write_text(json.dumps(data))
    with pytest.raises(ValidationError) as e:
        settings.load(f)
    assert field in [x.field for x in e.value.errors], e.value.errors
