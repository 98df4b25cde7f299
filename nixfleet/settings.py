"""Control-plane settings: defaults < settings file < flags. The one place that reads env.

A top-level module so that every layer (api, store users, reconciler, controlplane)
may import it without an import loop.
"""

from __future__ import annotations

import functools
import json
import os
import urllib.parse
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nixfleet import database_url
from nixfleet.database_url import DatabaseURL
from nixfleet.errors import FieldError, ValidationError
from nixfleet.policy import fleet
from nixfleet.policy.fleet import FleetPolicy
from nixfleet.wire import JSONObject

DEFAULT_PORT = 8470

# What a webhook can subscribe to (docs/webhooks.md, schemas/webhook-event.schema.json);
# store.migrations' triggers write them, tests/store/test_webhooks.py holds the two equal.
WEBHOOK_EVENTS = (
    "rollout.started",
    "rollout.paused",
    "rollout.resumed",
    "rollout.failed",
    "rollout.completed",
    "rollout.cancelled",
    "batch.started",
    "machine.failed",
    "machine.unhealthy",
    "machine.stale",
    "machine.reboot-needed",
)


@dataclass(frozen=True)
class Webhook:
    """One receiver: where to POST, which events, and the file holding the HMAC secret."""

    url: str
    secret_file: str
    events: tuple[str, ...] = ("*",)

    def wants(self, event: str) -> bool:
        return "*" in self.events or event in self.events


def display_url(url: str) -> str:
    """A webhook URL as logs and listings show it: no user info, no query string.

    Receivers such as chat services put their credential in the URL; the path is
    kept (it tells two receivers on one host apart) but cut short.
    """
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    path = parts.path if len(parts.path) <= 24 else parts.path[:20] + "..."
    return f"{parts.scheme}://{host}{port}{path}"


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
    # sqlite:PATH, a file path, or postgresql://… (nixfleet.database_url); "" is `db`.
    database_url: str = ""
    rollouts_dir: str | None = None
    admin_key_file: str | None = None
    history_days: int = 90
    history_max_events: int = 1000
    # Retention of deployments (store.retention; docs/rollouts.md "Retention"): hours a
    # finished rollout lists every machine (then only those that ended unhealthy),
    # days it lists those; days a release that was rolled out keeps its entries after
    # its last rollout changed, once no machine needs it (one never rolled out keeps
    # them rollout_retention_days).
    rollout_detail_hours: int = 1
    rollout_retention_days: int = 14
    release_retention_days: int = 1
    reconcile_interval: float = 2.0
    threads: int = 8
    workers: int = 1
    stale_after: int = 300
    max_body_bytes: int = 1024 * 1024
    default_poll_interval: int | None = None
    rollout_poll_hint: int = 5
    # Limits against hostile clients and faults (docs/security.md "Limits").
    connection_limit: int = 10_000
    idle_timeout: int = 30
    max_header_bytes: int = 64 * 1024
    write_lock_timeout: float = 5.0
    ui: bool = True  # serve the dashboard under /ui (False: no /ui route at all)
    ui_session_idle: int = 3600  # seconds a dashboard session lives without a request
    ui_secure_cookie: bool = False  # force Secure cookies (always set behind https)
    webhooks: tuple[Webhook, ...] = ()
    webhook_timeout: float = 10.0  # seconds for one delivery attempt, in total
    webhook_retry_initial: float = 10.0  # first back-off; doubles per failed attempt
    webhook_retry_max: float = 600.0  # back-off cap
    webhook_retry_for: float = 86_400.0  # give a delivery up this long after its event
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

    @property
    def database(self) -> DatabaseURL:
        """The database to open: `database_url`, else the SQLite file `db` (or the default)."""
        if self.database_url:
            return database_url.parse(self.database_url)
        return DatabaseURL("sqlite", path=Path(self.db) if self.db else default_db())

    def db_path(self) -> Path:
        """The SQLite file, for what only SQLite has (backup); PostgreSQL is refused."""
        database = self.database
        if database.path is None:
            raise ValidationError(
                "invalid control-plane settings",
                errors=[
                    FieldError(
                        "database_url",
                        "names a PostgreSQL database; this works on an SQLite file only",
                    )
                ],
            )
        return database.path


def load(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Settings from an optional JSON file, then non-None overrides; validated."""
    data: JSONObject = {}
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
    if "webhooks" in data:
        data["webhooks"] = parse_webhooks(data["webhooks"])
    settings = replace(Settings(), **data)
    settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    _check(settings)
    return settings


def parse_webhooks(raw: Any) -> tuple[Webhook, ...]:
    """`webhooks: [{url, events, secret_file}]`, every problem named by its field."""
    if not isinstance(raw, list):
        raise ValidationError(
            "invalid control-plane settings",
            errors=[FieldError("webhooks", "must be a list of {url, events, secret_file}")],
        )
    errors: list[FieldError] = []
    out: list[Webhook] = []
    for i, item in enumerate(raw):
        where = f"webhooks[{i}]"
        if not isinstance(item, dict):
            errors.append(FieldError(where, "must be an object {url, events, secret_file}"))
            continue
        for key in sorted(set(item) - {"url", "events", "secret_file"}):
            errors.append(
                FieldError(f"{where}.{key}", "unknown key; known: url, events, secret_file")
            )
        url, secret, events = item.get("url"), item.get("secret_file"), item.get("events", ["*"])
        if (
            not isinstance(url, str)
            or not url.startswith(("http://", "https://"))
            or (len(url) > 2048 or any(c.isspace() or ord(c) < 32 for c in url))
        ):
            errors.append(FieldError(f"{where}.url", "an http:// or https:// URL is required"))
        if not isinstance(secret, str) or not secret:
            errors.append(
                FieldError(
                    f"{where}.secret_file",
                    "the path of a file holding the HMAC secret is required (never the secret)",
                )
            )
        known = set(WEBHOOK_EVENTS) | {"*"}
        if (
            not isinstance(events, list)
            or not events
            or not all(isinstance(e, str) and e in known for e in events)
        ):
            errors.append(
                FieldError(
                    f"{where}.events",
                    f"a non-empty list of: *, {', '.join(WEBHOOK_EVENTS)}",
                )
            )
        if not errors:
            out.append(Webhook(str(url), str(secret), tuple(events)))
    if errors:
        raise ValidationError("invalid control-plane settings", errors=errors)
    return tuple(out)


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
        "rollout_detail_hours",
        "rollout_retention_days",
        "release_retention_days",
        "threads",
        "workers",
        "stale_after",
        "max_body_bytes",
        "rollout_poll_hint",
        "connection_limit",
        "idle_timeout",
        "max_header_bytes",
        "ui_session_idle",
    ):
        value = getattr(s, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            errors.append(FieldError(name, "must be a positive integer"))
    if isinstance(s.workers, int) and s.workers > 64:
        errors.append(FieldError("workers", "at most 64; one per CPU core is the useful most"))
    for name in ("ui", "ui_secure_cookie"):
        if not isinstance(getattr(s, name), bool):
            errors.append(FieldError(name, "must be true or false"))
    for name in (
        "reconcile_interval",
        "webhook_timeout",
        "webhook_retry_initial",
        "webhook_retry_max",
        "webhook_retry_for",
    ):
        value = getattr(s, name)
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            errors.append(FieldError(name, "must be a positive number of seconds"))
    if s.db and s.database_url:
        errors.append(
            FieldError("database_url", "give either db (an SQLite file) or database_url, not both")
        )
    elif s.database_url:
        try:
            database_url.parse(s.database_url)
        except ValidationError as e:
            errors += e.errors
    if not isinstance(s.write_lock_timeout, int | float) or not 0 < s.write_lock_timeout <= 600:
        errors.append(FieldError("write_lock_timeout", "must be a number of seconds in (0, 600]"))
    errors += fleet.errors(
        s.disruption_budgets, s.default_windows, s.reboot_groups, s.reboot_slots, s.reboot_timeout
    )
    if errors:
        raise ValidationError("invalid control-plane settings", errors=errors)
