"""Where the CLI finds the control plane and its credentials. The one place it reads env.

Precedence: flag > environment > config file > default. The config file
($XDG_CONFIG_HOME/nixfleet/config.toml) may hold `control_plane_url` and
`api_key_file`; a credentials file must not be readable by group or others.
"""

from __future__ import annotations

import os
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nixfleet.errors import UsageError

DEFAULT_URL = "http://127.0.0.1:8470"


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(os.environ.get("NIXFLEET_CONFIG") or Path(base) / "nixfleet" / "config.toml")


def color_allowed() -> bool:
    return "NO_COLOR" not in os.environ


def read_secret_file(path: Path) -> str:
    """A key from a file that only its owner can read (0600), or a UsageError saying so."""
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise UsageError(
                f"credentials file {path} is readable by group or others "
                f"(mode {stat.S_IMODE(mode):o}); run `chmod 600 {path}`"
            )
        return path.read_text().strip()
    except OSError as e:
        raise UsageError(f"cannot read credentials file {path}: {e.strerror}") from e


@dataclass(frozen=True)
class CliConfig:
    control_plane_url: str
    api_key: str | None


def resolve(url_flag: str | None, key_flag: str | None, key_file_flag: str | None) -> CliConfig:
    file_data: dict[str, Any] = {}
    path = config_path()
    if path.exists():
        try:
            file_data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise UsageError(f"cannot read {path}: {e}") from e
    url = (
        url_flag
        or os.environ.get("NIXFLEET_CONTROL_PLANE_URL")
        or file_data.get("control_plane_url")
        or DEFAULT_URL
    )
    key = key_flag or os.environ.get("NIXFLEET_API_KEY")
    key_file = (
        key_file_flag or os.environ.get("NIXFLEET_API_KEY_FILE") or file_data.get("api_key_file")
    )
    if key is None and key_file:
        key = read_secret_file(Path(str(key_file)).expanduser())
    return CliConfig(control_plane_url=str(url), api_key=key)


NIX_OFFLINE_CONFIG = "substituters =\nexperimental-features = nix-command flakes"


def child_env(**extra: str) -> dict[str, str]:
    """Environment for processes the CLI starts (demo): ours, plus Nix settings.

    Without substituters configured, each build would first wait for the public
    cache; a NIX_CONFIG the operator set wins.
    """
    env = dict(os.environ)
    env.setdefault("NIX_CONFIG", NIX_OFFLINE_CONFIG)
    env.update(extra)
    return env
