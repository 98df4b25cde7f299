"""The control plane's fleet-wide policy settings (DESIGN §11), parsed and checked once.

Settings keys (all optional):
- `disruption_budgets: [{tags: [db], max_in_flight: 1}]` hold across every rollout;
- `default_windows: [{tags: [db], windows: [...]}]` give a rollout without its own
  `windows:` the windows of the first entry whose tags its target tags include
  (`tags: []` matches every rollout), so "databases only at night" is said once;
- `reboot_groups: [{tags: [db], slots: 1, name: db}]`, `reboot_slots` (the default
  group's slots, 1) and `reboot_timeout` (seconds a reboot lease lasts, 900).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nixfleet.errors import FieldError
from nixfleet.policy import budgets, leases, taggroups
from nixfleet.policy import windows as windows_mod
from nixfleet.policy.budgets import Budget
from nixfleet.policy.leases import Group
from nixfleet.policy.windows import Window

DEFAULT_REBOOT_TIMEOUT = 900


@dataclass(frozen=True)
class DefaultWindows:
    tags: tuple[str, ...]
    windows: tuple[Window, ...]


@dataclass(frozen=True)
class FleetPolicy:
    budgets: tuple[Budget, ...] = ()
    default_windows: tuple[DefaultWindows, ...] = ()
    reboot_groups: tuple[Group, ...] = ()
    reboot_slots: int = 1
    reboot_timeout: int = DEFAULT_REBOOT_TIMEOUT

    def windows_for(self, own: Sequence[Window], target_tags: Sequence[str]) -> tuple[Window, ...]:
        """A rollout's windows: its own, else the first matching CP default, else none."""
        if own:
            return tuple(own)
        tags = set(target_tags)
        for d in self.default_windows:
            if set(d.tags) <= tags:
                return d.windows
        return ()


def from_settings(
    disruption_budgets: Any = (),
    default_windows: Any = (),
    reboot_groups: Any = (),
    reboot_slots: int = 1,
    reboot_timeout: int = DEFAULT_REBOOT_TIMEOUT,
) -> FleetPolicy:
    """The policy from settings that `errors` accepted."""
    return FleetPolicy(
        budgets=budgets.parse_budgets(disruption_budgets),
        default_windows=tuple(
            DefaultWindows(tuple(sorted(set(d.get("tags", ())))), windows_mod.parse(d["windows"]))
            for d in default_windows or ()
        ),
        reboot_groups=leases.parse_groups(reboot_groups),
        reboot_slots=reboot_slots,
        reboot_timeout=reboot_timeout,
    )


def _window_shape(item: Any, where: str) -> list[FieldError]:
    if not isinstance(item, Mapping):
        return [
            FieldError(
                where,
                'must be {days: [mon, ...], start: "09:00", end: "16:00", timezone: Europe/Berlin}',
            )
        ]
    out = []
    extra = sorted(set(item) - {"days", "start", "end", "timezone"})
    if extra:
        out.append(
            FieldError(f"{where}.{extra[0]}", "unknown field; allowed: days, end, start, timezone")
        )
    for key in ("start", "end"):
        value = item.get(key)
        if not isinstance(value, str) or not windows_mod.TIME_RE.match(value):
            out.append(FieldError(f"{where}.{key}", 'must be a local time HH:MM like "09:00"'))
    days = item.get("days")
    if days is not None and (
        not isinstance(days, list)
        or not days
        or not all(isinstance(d, str) and d in windows_mod.DAYS for d in days)
    ):
        out.append(FieldError(f"{where}.days", f"must be a list of {', '.join(windows_mod.DAYS)}"))
    if "timezone" in item and not isinstance(item["timezone"], str):
        out.append(FieldError(f"{where}.timezone", "must be an IANA time zone like Europe/Berlin"))
    return out


def errors(
    disruption_budgets: Any = (),
    default_windows: Any = (),
    reboot_groups: Any = (),
    reboot_slots: Any = 1,
    reboot_timeout: Any = DEFAULT_REBOOT_TIMEOUT,
) -> list[FieldError]:
    """Every problem of the policy settings, each naming its field."""
    out = budgets.budget_errors(
        list(disruption_budgets) if isinstance(disruption_budgets, tuple) else disruption_budgets
    )
    out += leases.group_errors(
        list(reboot_groups) if isinstance(reboot_groups, tuple) else reboot_groups
    )
    items = list(default_windows) if isinstance(default_windows, tuple) else default_windows
    what = "{tags: [...], windows: [...]}"
    for where, d in taggroups.entries(items, "default_windows", what, ("tags", "windows"), out):
        message = "must be a list of tags ([] matches every rollout)"
        taggroups.check_tags(out, where, d.get("tags", []), message, empty=True)
        ws = d.get("windows")
        if not isinstance(ws, list) or not ws:
            out.append(FieldError(f"{where}.windows", "must be a non-empty list of windows"))
            continue
        shape = [e for j, w in enumerate(ws) for e in _window_shape(w, f"{where}.windows[{j}]")]
        out += shape or windows_mod.errors(ws, f"{where}.windows")
    for name, value in (("reboot_slots", reboot_slots), ("reboot_timeout", reboot_timeout)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            out.append(FieldError(name, "must be a positive integer"))
    return out
