"""Control-plane settings: defaults < settings file < flags. The one place that reads env.

A top-level module so that every layer (api, store users, reconciler, controlplane)
may import it without an import loop.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nixfleet.errors import FieldError, ValidationError
from nixfleet.policy import fleet
from nixfleet.policy.fleet import FleetPolicy

DEFAULT_PORT = 8470


def default_db() -> Path:
    """An embedded default that works for a first run without root.

    $STATE_DIRECTORY (systemd's StateDirectory=) wins; else $XDG_STATE_HOME or
    ~/.local/state, so `nixfleet-control-plane` alone just works.
    """
    state = os.environ.get("STATE_DIRECTORY")
    if state:
        return Path(state.split(":")[0]) / "nixfleet.db"
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "nixfleet" / "nixfleet.db"


@dataclass(frozen=True)
class Settings:
    listen: str = f"127.0.0.1:{DEFAULT_PORT}"
    db: str = ""
    rollouts_dir: str | None = None
    admin_key_file: str | None = None
    history_days: int = 90
    history_max_events: int = 1000
    reconcile_interval: float = 2.0
    threads: int = 8
    workers: int = 1
    stale_after: int = 300
    max_body_bytes: int = 1024 * 1024
    default_poll_interval: int | None = None
    rollout_poll_hint: int = 5
    # DESIGN §11, parsed and documented in nixfleet.policy.fleet (docs/rollouts.md).
    disruption_budgets: tuple[Any, ...] = ()
    default_windows: tuple[Any, ...] = ()
    reboot_groups: tuple[Any, ...] = ()
    reboot_slots: int = 1
    reboot_timeout: int = 900
    # For tests and drills: a file holding an RFC 3339 time that maintenance windows
    # are judged by instead of the system clock (health timeouts keep the real one).
    policy_clock_file: str | None = None

    @functools.cached_property
    def fleet_policy(self) -> FleetPolicy:
        """The §11 settings as pure-policy data (parsed once; `load` has checked them)."""
        return fleet.from_settings(
            self.disruption_budgets,
            self.default_windows,
            self.reboot_groups,
            self.reboot_slots,
            self.reboot_timeout,
        )

    def policy_now(self, now: datetime) -> datetime:
        """The clock maintenance windows are judged by: `now`, or policy_clock_file's time."""
        if self.policy_clock_file is None:
            return now
        try:
            text = Path(self.policy_clock_file).read_text().strip()
            return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)
        except (OSError, ValueError) as e:
            raise ValidationError(
                f"policy_clock_file {self.policy_clock_file}: cannot read a time from it: {e}"
            ) from e

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]") or "127.0.0.1", int(port)

    def db_path(self) -> Path:
        return Path(self.db) if self.db else default_db()


def load(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Settings from an optional JSON file, then non-None overrides; validated."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ValidationError(f"cannot read settings file {path}: {e}") from e
        if not isinstance(data, dict):
            raise ValidationError(f"settings file {path} must hold a JSON object")
    known = {f.name: f for f in fields(Settings)}
    errors = [
        FieldError(k, f"unknown setting; known: {', '.join(sorted(known))}")
        for k in data
        if k not in known
    ]
    if errors:
        raise ValidationError(f"invalid settings file {path}", errors=errors)
    settings = replace(Settings(), **data)
    settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    _check(settings)
    return settings


def _check(s: Settings) -> None:
    errors: list[FieldError] = []
    host, _, port = s.listen.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        errors.append(
            FieldError("listen", f"{s.listen!r}: expected HOST:PORT, e.g. 127.0.0.1:8470")
        )
    for name in (
        "history_days",
        "history_max_events",
        "threads",
        "workers",
        "stale_after",
        "max_body_bytes",
        "rollout_poll_hint",
    ):
        value = getattr(s, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            errors.append(FieldError(name, "must be a positive integer"))
    if isinstance(s.workers, int) and s.workers > 64:
        errors.append(FieldError("workers", "at most 64; one per CPU core is the useful most"))
    if not isinstance(s.reconcile_interval, int | float) or s.reconcile_interval <= 0:
        errors.append(FieldError("reconcile_interval", "must be a positive number of seconds"))
    errors += fleet.errors(
        s.disruption_budgets, s.default_windows, s.reboot_groups, s.reboot_slots, s.reboot_timeout
    )
    if errors:
        raise ValidationError("invalid control-plane settings", errors=errors)
