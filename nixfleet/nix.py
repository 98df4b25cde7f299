"""Typed wrappers over the nix commands nixfleet needs.

Every call goes through `process.run` (timeouts, logging, CommandError with the
stderr tail). Output parsing copes with both Nix 2.8 (Debian's nix-bin, the oldest we
support) and newer releases, whose JSON shapes differ. Callers choose the environment
(for instance `NIX_CONFIG`); nothing here hard-codes nix settings.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from nixfleet import process
from nixfleet.errors import CommandError, FieldError, ValidationError
from nixfleet.policy.reboot import BOOT_LINKS

Env = Mapping[str, str] | None

# Timeouts (seconds). Fetching a whole NixOS closure over a slow link takes a while;
# metadata queries must not hang the agent's loop.
QUERY_TIMEOUT = 60.0
PROFILE_TIMEOUT = 120.0
FETCH_TIMEOUT = 3600.0
BUILD_TIMEOUT = 6 * 3600.0

_GENERATION_LINE = re.compile(
    r"^\s*(?P<number>\d+)\s+(?P<date>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)"
    r"\s*(?P<current>\(current\))?\s*$"
)


@dataclass(frozen=True)
class PathInfo:
    """One entry of `nix path-info --json`; `valid` is False for paths not in the store."""

    path: str
    valid: bool = True
    nar_hash: str | None = None
    nar_size: int | None = None
    references: tuple[str, ...] = ()
    signatures: tuple[str, ...] = ()
    deriver: str | None = None
    ultimate: bool = False


@dataclass(frozen=True)
class Generation:
    """One generation of a Nix profile (`nix-env --list-generations` + its link)."""

    number: int
    created: str
    current: bool
    path: str | None


def _paths(paths: Sequence[str]) -> list[str]:
    """Paths for a command line: absolute, so none can be read as an option.

    `--` goes before them too, but Nix 2.8's nix-store and nix-env still parse
    `--help` or `--option` after it as options; only an absolute path is safe.
    """
    out = [str(p) for p in paths]
    for p in out:
        if not p.startswith("/") or "\0" in p:
            raise ValidationError(
                f"{p[:100]!r} is not an absolute path; refusing to pass it to nix",
                errors=[FieldError("path", "must be an absolute store path")],
            )
    return out


def _nix_cmd(store: str | None) -> list[str]:
    return ["nix", "--store", store] if store else ["nix"]


def _options(options: Mapping[str, str] | None) -> list[str]:
    out: list[str] = []
    for name, value in (options or {}).items():
        out += ["--option", name, value]
    return out


def _json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as e:
        raise CommandError(f"{what}: could not parse JSON output: {e}") from e


# --- queries -------------------------------------------------------------------------


def parse_path_info(data: Any) -> list[PathInfo]:
    """Parse `nix path-info --json`: a list on Nix <= 2.18, an object keyed by path later."""
    items: list[tuple[str, Any]]
    if isinstance(data, list):
        items = [(str(entry.get("path", "")), entry) for entry in data]
    elif isinstance(data, dict):
        items = list(data.items())
    else:
        raise CommandError(f"nix path-info: unexpected JSON {type(data).__name__}")
    out: list[PathInfo] = []
    for path, entry in items:
        if entry is None or (isinstance(entry, dict) and entry.get("valid") is False):
            out.append(PathInfo(path=path, valid=False))
            continue
        out.append(
            PathInfo(
                path=path,
                valid=True,
                nar_hash=entry.get("narHash"),
                nar_size=entry.get("narSize"),
                references=tuple(entry.get("references") or ()),
                signatures=tuple(entry.get("signatures") or ()),
                deriver=entry.get("deriver"),
                ultimate=bool(entry.get("ultimate", False)),
            )
        )
    return out


def path_info(
    paths: Sequence[str],
    *,
    store: str | None = None,
    recursive: bool = False,
    env: Env = None,
    timeout: float = QUERY_TIMEOUT,
) -> list[PathInfo]:
    """Metadata of store paths in `store` (default: the local store, or a cache URL)."""
    argv = [*_nix_cmd(store), "path-info", "--json"]
    if recursive:
        argv.append("--recursive")
    done = process.run([*argv, "--", *_paths(paths)], env=env, timeout=timeout)
    return parse_path_info(_json(done.stdout, "nix path-info"))


def closure_size(
    path: str, *, store: str | None = None, env: Env = None, timeout: float = QUERY_TIMEOUT
) -> int | None:
    """`nix path-info -S`: the NAR size of the path's whole closure in `store` (a cache
    URL, or the local store); None when the store does not have it."""
    done = process.run(
        [*_nix_cmd(store), "path-info", "--json", "-S", path], env=env, timeout=timeout, check=False
    )
    if done.returncode != 0:
        return None
    data = _json(done.stdout, "nix path-info -S")
    entries = data if isinstance(data, list) else list((data or {}).values())
    for entry in entries:
        if isinstance(entry, dict) and isinstance(entry.get("closureSize"), int):
            return int(entry["closureSize"])
    return None


def boot_links(system: str | Path) -> dict[str, str | None]:
    """`readlink SYSTEM/{initrd,kernel,kernel-modules}` (None where a link is missing):
    what NixOS's autoUpgrade compares to decide that a reboot is needed."""
    out: dict[str, str | None] = {}
    for name in BOOT_LINKS:
        try:
            out[name] = os.readlink(Path(system) / name)
        except OSError:
            out[name] = None
    return out


def is_valid(path: str, *, env: Env = None) -> bool:
    """True when `path` is a valid path in the local store (nothing to fetch)."""
    if not path.startswith("/"):
        return False  # an option such as --help, never a valid path
    done = process.run(
        ["nix-store", "--check-validity", "--", *_paths([path])],
        env=env,
        timeout=QUERY_TIMEOUT,
        check=False,
    )
    return done.returncode == 0


# --- fetching --------------------------------------------------------------------------


def copy_from(
    cache_url: str,
    paths: Sequence[str],
    *,
    trusted_public_keys: Sequence[str] = (),
    env: Env = None,
    timeout: float = FETCH_TIMEOUT,
) -> None:
    """Copy closures from a binary cache into the local store, checking signatures.

    Nix refuses paths that are unsigned, signed by a key not in `trusted_public_keys`,
    or whose NAR does not match its narinfo: the copy fails and nothing is registered.
    Without keys, the machine's own nix.conf `trusted-public-keys` apply.
    """
    opts = {"trusted-public-keys": " ".join(trusted_public_keys)} if trusted_public_keys else {}
    process.run(
        ["nix", "copy", "--from", cache_url, *_options(opts), "--", *_paths(paths)],
        env=env,
        timeout=timeout,
    )


def realise(paths: Sequence[str], *, env: Env = None, timeout: float = FETCH_TIMEOUT) -> list[str]:
    """Realise paths through the configured substituters (no cache URL given)."""
    done = process.run(["nix-store", "--realise", "--", *_paths(paths)], env=env, timeout=timeout)
    return [line for line in done.stdout.splitlines() if line.startswith("/")]


def copy_to(
    url: str, paths: Sequence[str], *, env: Env = None, timeout: float = FETCH_TIMEOUT
) -> None:
    """Push closures to a binary cache or remote store (`release create --push`)."""
    process.run(["nix", "copy", "--to", url, "--", *_paths(paths)], env=env, timeout=timeout)


def sign(
    paths: Sequence[str],
    key_file: str | Path,
    *,
    recursive: bool = True,
    env: Env = None,
    timeout: float = PROFILE_TIMEOUT,
) -> None:
    """Sign local store paths (their closure by default) with a secret key file."""
    argv = ["nix", "store", "sign", "--key-file", str(key_file)]
    if recursive:
        argv.append("--recursive")
    process.run([*argv, "--", *_paths(paths)], env=env, timeout=timeout)


def generate_cache_key(
    name: str, secret_file: str | Path, public_file: str | Path, *, env: Env = None
) -> str:
    """Create a binary cache signing key pair; return the public key text."""
    process.run(
        ["nix-store", "--generate-binary-cache-key", name, str(secret_file), str(public_file)],
        env=env,
        timeout=QUERY_TIMEOUT,
    )
    return Path(public_file).read_text().strip()


# --- profiles --------------------------------------------------------------------------


def profile_set(profile: str | Path, path: str, *, env: Env = None) -> None:
    """Make `path` the new current generation of `profile` (creating its directory)."""
    Path(profile).parent.mkdir(parents=True, exist_ok=True)
    process.run(
        ["nix-env", "-p", str(profile), "--set", "--", *_paths([path])],
        env=env,
        timeout=PROFILE_TIMEOUT,
    )


def profile_rollback(profile: str | Path, *, env: Env = None) -> None:
    """Switch `profile` to its previous generation (what `nixos-rebuild --rollback` does)."""
    process.run(["nix-env", "-p", str(profile), "--rollback"], env=env, timeout=PROFILE_TIMEOUT)


def parse_generations(text: str, profile: str | Path) -> list[Generation]:
    """Parse `nix-env --list-generations` and resolve each generation's link."""
    out: list[Generation] = []
    for line in text.splitlines():
        m = _GENERATION_LINE.match(line)
        if not m:
            continue
        number = int(m["number"])
        link = f"{profile}-{number}-link"
        target = os.path.realpath(link) if os.path.lexists(link) else None
        out.append(Generation(number, m["date"], m["current"] is not None, target))
    return out


def list_generations(profile: str | Path, *, env: Env = None) -> list[Generation]:
    """Generations of `profile`, oldest first; empty when the profile does not exist."""
    if not os.path.lexists(profile):
        return []
    done = process.run(
        ["nix-env", "-p", str(profile), "--list-generations"], env=env, timeout=QUERY_TIMEOUT
    )
    return parse_generations(done.stdout, profile)


# --- evaluation and builds (release create) -------------------------------------------


def eval_json(
    installable: str,
    *,
    apply: str | None = None,
    options: Mapping[str, str] | None = None,
    env: Env = None,
    timeout: float = BUILD_TIMEOUT,
) -> Any:
    """`nix eval --json INSTALLABLE [--apply FN]`, decoded."""
    argv = ["nix", "eval", "--json", *_options(options), installable]
    if apply is not None:
        argv += ["--apply", apply]
    return _json(process.run(argv, env=env, timeout=timeout).stdout, "nix eval")


def parse_build_output(text: str) -> list[str]:
    """Out paths from `nix build --json` (list of {drvPath, outputs}) or plain path lines."""
    text = text.strip()
    if not text:
        return []
    if text.startswith("["):
        out: list[str] = []
        for entry in _json(text, "nix build"):
            outputs: Mapping[str, str] = entry.get("outputs") or {}
            out.extend(outputs.values())
        return out
    return [line.strip() for line in text.splitlines() if line.strip().startswith("/")]


def build(
    installables: Sequence[str],
    *,
    options: Mapping[str, str] | None = None,
    env: Env = None,
    timeout: float = BUILD_TIMEOUT,
) -> list[str]:
    """Build without result links; return the out paths (Nix 2.8 has `--json`)."""
    argv = ["nix", "build", "--no-link", "--json", *_options(options), *installables]
    return parse_build_output(process.run(argv, env=env, timeout=timeout).stdout)


class FlakeLocked(TypedDict, total=False):
    rev: str


class FlakeMetadata(TypedDict, total=False):
    """The part of `nix flake metadata --json` nixfleet reads (Nix sends more)."""

    url: str
    revision: str  # absent for a dirty tree
    dirtyRevision: str  # Nix >= 2.17, for a dirty git tree
    lastModified: int
    locked: FlakeLocked


def flake_metadata(ref: str, *, env: Env = None, timeout: float = QUERY_TIMEOUT) -> FlakeMetadata:
    """`nix flake metadata --json REF` (url, revision, lastModified, locks...)."""
    done = process.run(["nix", "flake", "metadata", "--json", ref], env=env, timeout=timeout)
    data: FlakeMetadata = _json(done.stdout, "nix flake metadata")
    if not isinstance(data, dict):
        raise CommandError("nix flake metadata: expected a JSON object")
    return data


def diff_closures(a: str, b: str, *, env: Env = None, timeout: float = QUERY_TIMEOUT) -> str:
    """Human-readable package version changes between two closures (may be empty)."""
    return process.run(
        ["nix", "store", "diff-closures", "--", *_paths([a, b])], env=env, timeout=timeout
    ).stdout
