"""Where the CLI finds the control plane and its credentials. The one place it reads env.

The config file ($NIXFLEET_CONFIG, else $XDG_CONFIG_HOME/nixfleet/config.toml) holds
named contexts, kubeconfig-style, and which one is current:

    current_context = "prod"
    [contexts.prod]
    control_plane_url = "https://fleet.example.com"
    api_key_file = "~/.config/nixfleet/prod.key"

Precedence, for the URL and the key alike: flag; then a context named explicitly
(--context, NIXFLEET_CONTEXT); then NIXFLEET_CONTROL_PLANE_URL / NIXFLEET_API_KEY /
NIXFLEET_API_KEY_FILE; then the file's current context; then its top-level keys; then
the default. The file names key *files*, never keys; a credentials file must not be
readable by group or others.
"""

from __future__ import annotations

import os
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from nixfleet.errors import NotFoundError, UsageError
from nixfleet.wire import JSONObject

DEFAULT_URL = "http://127.0.0.1:8470"
CONTEXT_KEYS = ("control_plane_url", "api_key_file")


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(os.environ.get("NIXFLEET_CONFIG") or Path(base) / "nixfleet" / "config.toml")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nixfleet"


def no_color_requested() -> bool:
    """no-color.org: NO_COLOR set to a non-empty value turns colour off."""
    return bool(os.environ.get("NO_COLOR"))


def env_context() -> str | None:
    return os.environ.get("NIXFLEET_CONTEXT") or None


def completion_requested() -> bool:
    """Click's shell completion protocol runs the program with this variable set."""
    return "_NIXFLEET_COMPLETE" in os.environ


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


# --- the config file --------------------------------------------------------------


def load_file(path: Path | None = None) -> JSONObject:
    path = path or config_path()
    if not path.exists():
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"cannot read {path}: {e}") from e
    contexts = data.get("contexts", {})
    if not isinstance(contexts, dict) or not all(isinstance(c, dict) for c in contexts.values()):
        raise UsageError(f"{path}: `contexts` must be tables, e.g. [contexts.prod]")
    if "api_key" in data or any("api_key" in c for c in contexts.values()):
        raise UsageError(
            f"{path} holds an API key: keep keys in 0600 files and name them with api_key_file"
        )
    return data


def save_file(data: JSONObject, path: Path | None = None) -> Path:
    path = path or config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(tomli_w.dumps(data))
    tmp.replace(path)
    return path


def contexts(data: JSONObject) -> dict[str, JSONObject]:
    found: dict[str, JSONObject] = data.get("contexts", {})
    return found


def set_context(name: str, values: dict[str, str | None]) -> Path:
    data = load_file()
    entry = contexts(data).get(name, {})
    entry.update({k: v for k, v in values.items() if v is not None})
    data.setdefault("contexts", {})[name] = entry
    data.setdefault("current_context", name)
    return save_file(data)


def use_context(name: str) -> Path:
    data = load_file()
    if name not in contexts(data):
        raise NotFoundError(f"no context {name!r}{_known(data)}")
    data["current_context"] = name
    return save_file(data)


def delete_context(name: str) -> Path:
    data = load_file()
    if name not in contexts(data):
        raise NotFoundError(f"no context {name!r}{_known(data)}")
    del data["contexts"][name]
    if data.get("current_context") == name:
        del data["current_context"]
    return save_file(data)


def _known(data: JSONObject) -> str:
    names = sorted(contexts(data))
    if not names:
        return f" in {config_path()}; create one with `nixfleet config set-context NAME`"
    return f"; known: {', '.join(names)}"


# --- resolution ----------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    value: str | None
    source: str  # where it came from, for `config view`


@dataclass(frozen=True)
class CliConfig:
    control_plane_url: str
    api_key: str | None
    context: str | None = None
    url_source: str = "default"
    key_source: str = "none"
    key_file: str | None = None
    path: Path | None = None


def resolve(
    url_flag: str | None,
    key_flag: str | None,
    key_file_flag: str | None,
    context_flag: str | None = None,
    read_key: bool = True,
) -> CliConfig:
    path = config_path()
    data = load_file(path)
    named = context_flag or env_context()
    chosen = named or data.get("current_context")
    ctx: JSONObject = {}
    if chosen:
        if chosen not in contexts(data):
            if named:
                raise UsageError(f"no context {chosen!r}{_known(data)}")
            raise UsageError(f"{path}: current_context {chosen!r} is not defined{_known(data)}")
        ctx = contexts(data)[chosen]
    where = f"context {chosen}"

    def pick(flag: str | None, env: str, key: str) -> Setting:
        # An explicitly named context beats the environment; the current one does not.
        candidates: list[tuple[str | None, str]] = [(flag, "flag")]
        if named:
            candidates += [(ctx.get(key), where), (os.environ.get(env), f"${env}")]
        else:
            candidates += [(os.environ.get(env), f"${env}"), (ctx.get(key), where)]
        candidates.append((data.get(key), str(path)))
        for value, source in candidates:
            if value:
                return Setting(str(value), source)
        return Setting(None, "none")

    url = pick(url_flag, "NIXFLEET_CONTROL_PLANE_URL", "control_plane_url")
    key_file = pick(key_file_flag, "NIXFLEET_API_KEY_FILE", "api_key_file")
    key = Setting(key_flag, "flag") if key_flag else Setting(None, "none")
    env_key = os.environ.get("NIXFLEET_API_KEY")
    if key.value is None and env_key and not (named and key_file.value):
        key = Setting(env_key, "$NIXFLEET_API_KEY")
    if key.value is None and key_file.value:
        key = Setting(
            read_secret_file(Path(key_file.value).expanduser()) if read_key else "",
            f"file {key_file.value} ({key_file.source})",
        )
    return CliConfig(
        control_plane_url=url.value or DEFAULT_URL,
        api_key=key.value,
        context=chosen,
        url_source=url.source if url.value else "default",
        key_source=key.source,
        key_file=key_file.value,
        path=path,
    )


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
