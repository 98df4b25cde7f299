"""Agent configuration: the JSON file the NixOS module writes, overridden by flags.

This is the only agent module that reads `os.environ` (DESIGN §2 rule 6): it takes
one snapshot, which the rest of the agent uses (for example as the switch script's
environment), so behaviour never depends on the environment changing underneath.

The file is re-read when it changes (`reload_if_changed`, a stat per cycle): the
NixOS module keeps it at /etc/nixfleet/agent.json, which each generation points at
its own store file, so a switch that changes tags or checks takes effect in the
next report without restarting the agent (DESIGN §5).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from nixfleet import schemas
from nixfleet.errors import FieldError, NixfleetError, UsageError, ValidationError
from nixfleet.wire import JSONObject

log = logging.getLogger(__name__)

DEFAULTS: JSONObject = {
    "tags": [],
    "poll_interval": 60,
    "backoff_initial": 5,
    "backoff_max": 300,
    "cache_url": None,
    "trusted_public_keys": [],
    "token_file": None,
    "enroll_token_file": None,
    "profile": "/nix/var/nix/profiles/system",
    "current_system": "/run/current-system",
    "booted_system": "/run/booted-system",
    "reboot_command": ["systemctl", "reboot"],
    "state_dir": "/var/lib/nixfleet-agent",
    "use_systemd_run": False,
    "health_checks": {},
    "dry_run": False,
    "allow_insecure": False,
    "allowed_cache_schemes": [],
    "confirm_timeout": None,
}


@dataclass(frozen=True)
class HttpCheck:
    name: str
    url: str
    expected_status: int = 200
    timeout: float = 10.0


@dataclass(frozen=True)
class CommandCheck:
    name: str
    argv: tuple[str, ...]
    timeout: float = 30.0


@dataclass(frozen=True)
class HealthChecks:
    systemd: tuple[str, ...] = ()
    http: tuple[HttpCheck, ...] = ()
    command: tuple[CommandCheck, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.systemd or self.http or self.command)


@dataclass(frozen=True)
class Source:
    """Where a config came from, to load it again when the file changes."""

    path: str
    overrides: Mapping[str, Any]
    # (device, inode, size, mtime) of the file the path resolves to; None: unreadable.
    stamp: tuple[int, int, int, int] | None


def _stamp(path: str) -> tuple[int, int, int, int] | None:
    # stat() follows /etc/nixfleet/agent.json -> /etc/static/... -> /nix/store/...:
    # a new generation's file is a new inode even when its mtime is the epoch.
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class AgentConfig:
    control_plane_url: str
    machine_id: str
    token_file: str | None = None
    enroll_token_file: str | None = None
    tags: tuple[str, ...] = ()
    poll_interval: float = 60.0
    backoff_initial: float = 5.0
    backoff_max: float = 300.0
    cache_url: str | None = None
    trusted_public_keys: tuple[str, ...] = ()
    profile: str = "/nix/var/nix/profiles/system"
    current_system: str = "/run/current-system"
    booted_system: str = "/run/booted-system"
    reboot_command: tuple[str, ...] = ("systemctl", "reboot")
    state_dir: str = "/var/lib/nixfleet-agent"
    use_systemd_run: bool = False
    health_checks: HealthChecks = HealthChecks()
    dry_run: bool = False
    allow_insecure: bool = False
    # Cache URL schemes accepted from the CP beyond https/http (agent/answer.py).
    allowed_cache_schemes: tuple[str, ...] = ()
    confirm_timeout: float | None = None  # seconds; a rollout's confirm_timeout overrides
    # Snapshot of the process environment, taken once at load time.
    environ: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)
    source: Source | None = field(default=None, repr=False, compare=False)

    def child_env(self, **extra: str) -> dict[str, str]:
        """Environment for a child process: the agent's own plus `extra`."""
        return {**self.environ, **extra}


def _read_file(path: str | Path) -> JSONObject:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise UsageError(f"cannot read agent config {path}: {e.strerror or e}") from e
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ValidationError(
            f"agent config {path} is not valid JSON",
            errors=[FieldError("(document)", str(e), getattr(e, "lineno", None))],
        ) from e
    if not isinstance(data, dict):
        raise ValidationError(
            f"agent config {path} must be a JSON object",
            errors=[FieldError("(document)", "must be an object")],
        )
    return data


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_transport(url: str, allow_insecure: bool) -> None:
    """Refuse plain http:// to anything but loopback: the token would travel in clear."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "http" and not allow_insecure and not _is_loopback(parts.hostname or ""):
        raise UsageError(
            f"refusing plain http:// to non-loopback control plane {url}: use https:// "
            "(TLS in front of the control plane) or set allow_insecure / --allow-insecure"
        )


def load_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> AgentConfig:
    """Merge defaults < config file < overrides (flags; None means unset), validate."""
    # Stamp before reading: a change that lands during the read is seen next time.
    source = Source(str(path), dict(overrides or {}), _stamp(str(path))) if path else None
    doc: JSONObject = _read_file(path) if path is not None else {}
    schemas.validate("agent-config", doc, what=f"agent config {path}")
    merged: JSONObject = {**DEFAULTS, **doc}
    for key, value in (overrides or {}).items():
        if value is None or (key == "trusted_public_keys" and not value):
            continue
        merged[key] = list(value) if isinstance(value, tuple) else value
    merged.setdefault("machine_id", socket.gethostname())
    if "control_plane_url" not in merged:
        raise ValidationError(
            "agent config: no control plane URL",
            errors=[FieldError("control_plane_url", "is required (config file or flag)")],
        )
    # Flags go through the same schema, so their errors name the same fields.
    schemas.validate(
        "agent-config",
        {k: v for k, v in merged.items() if k in schemas.load("agent-config")["properties"]},
        what="agent configuration (file and flags)",
    )
    check_transport(merged["control_plane_url"], bool(merged["allow_insecure"]))
    hc: Mapping[str, Any] = merged["health_checks"] or {}
    return AgentConfig(
        control_plane_url=merged["control_plane_url"].rstrip("/"),
        machine_id=merged["machine_id"],
        token_file=merged["token_file"],
        enroll_token_file=merged["enroll_token_file"],
        tags=tuple(merged["tags"]),
        poll_interval=float(merged["poll_interval"]),
        backoff_initial=float(merged["backoff_initial"]),
        backoff_max=float(merged["backoff_max"]),
        cache_url=merged["cache_url"],
        trusted_public_keys=tuple(merged["trusted_public_keys"]),
        profile=merged["profile"],
        current_system=merged["current_system"],
        booted_system=merged["booted_system"],
        reboot_command=tuple(merged["reboot_command"]),
        state_dir=merged["state_dir"],
        use_systemd_run=bool(merged["use_systemd_run"]),
        health_checks=HealthChecks(
            systemd=tuple(hc.get("systemd", ())),
            http=tuple(
                HttpCheck(
                    c["name"],
                    c["url"],
                    int(c.get("expected_status", 200)),
                    float(c.get("timeout", 10)),
                )
                for c in hc.get("http", ())
            ),
            command=tuple(
                CommandCheck(c["name"], tuple(c["argv"]), float(c.get("timeout", 30)))
                for c in hc.get("command", ())
            ),
        ),
        dry_run=bool(merged["dry_run"]),
        allow_insecure=bool(merged["allow_insecure"]),
        allowed_cache_schemes=tuple(s.lower() for s in merged["allowed_cache_schemes"]),
        confirm_timeout=float(merged["confirm_timeout"]) if merged["confirm_timeout"] else None,
        environ=dict(os.environ if environ is None else environ),
        source=source,
    )


def reload_if_changed(config: AgentConfig) -> AgentConfig | None:
    """The config loaded afresh if its file changed since `config` was read, else None.

    A changed file that is broken (invalid JSON, refused by the schema) is logged
    once and the current config is kept: a bad generation must not stop the agent
    that can roll it back. Flags keep overriding the file.
    """
    src = config.source
    if src is None:
        return None
    stamp = _stamp(src.path)
    if stamp is None or stamp == src.stamp:
        return None
    try:
        fresh = load_config(src.path, src.overrides, config.environ)
    except NixfleetError as e:
        log.error("agent config %s changed but is unusable, keeping the old one: %s", src.path, e)
        return replace(config, source=replace(src, stamp=stamp))
    log.info("agent config %s changed: re-read it", src.path)
    return fresh


def token_candidates(config: AgentConfig) -> list[Path]:
    """Where the machine token may be, in order: token_file, credentials, state dir."""
    out: list[Path] = []
    if config.token_file:
        out.append(Path(config.token_file))
    creds = config.environ.get("CREDENTIALS_DIRECTORY")
    if creds:
        out.append(Path(creds) / "token")
    out.append(Path(config.state_dir) / "token")
    return out


def enroll_token_candidates(config: AgentConfig) -> list[Path]:
    """Enrollment token: enroll_token_file, else `$CREDENTIALS_DIRECTORY/enroll-token`
    (the NixOS module passes it with `LoadCredential=enroll-token:...`)."""
    out: list[Path] = []
    if config.enroll_token_file:
        out.append(Path(config.enroll_token_file))
    creds = config.environ.get("CREDENTIALS_DIRECTORY")
    if creds:
        out.append(Path(creds) / "enroll-token")
    return out


def read_token(config: AgentConfig) -> str | None:
    """The first non-empty machine token found (never logged)."""
    return _first(token_candidates(config))


def read_enroll_token(config: AgentConfig) -> str | None:
    return _first(enroll_token_candidates(config))


def _first(candidates: list[Path]) -> str | None:
    for candidate in candidates:
        try:
            token = candidate.read_text().strip()
        except OSError:
            continue
        if token:
            return token
    return None
