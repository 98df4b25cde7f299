"""Releases from a flake, and release TOML files.

`create_release` evaluates the flake's nixosConfigurations (host list, tags,
platform), builds each `config.system.build.toplevel` (or only evaluates its
outPath), and returns a Release whose id is a hash of its entries. Every nix call
goes through nixfleet.nix. The TOML helpers read and write releases/<id>.toml and
report schema errors with the line they sit on.
"""

from __future__ import annotations

import fnmatch
import getpass
import hashlib
import json
import re
import socket
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import tomli_w

from nixfleet import nix, schemas, wire
from nixfleet.errors import FieldError, UsageError, ValidationError
from nixfleet.models import (
    Release,
    ReleaseEntry,
    isoformat,
    parse_time,
    release_id_from_digest,
)

# --- release identity and documents ---------------------------------------------------

RELEASE_SCHEMA = "release"  # schemas/release.schema.json: API bodies and release TOML files


def release_id(entries: Sequence[ReleaseEntry]) -> str:
    """A hash of the sorted entries in the release-id format: same entries, same id."""
    canonical = json.dumps(
        [
            [e.hostname, e.store_path, e.platform, sorted(e.tags)]
            for e in sorted(entries, key=lambda e: e.hostname)
        ],
        separators=(",", ":"),
    )
    return release_id_from_digest(hashlib.sha256(canonical.encode()).hexdigest())


def release_from_document(doc: Any, what: str = "release") -> Release:
    """Validate a release document (API body or parsed TOML) and build the Release."""
    schemas.validate(RELEASE_SCHEMA, doc, what)
    errors: list[FieldError] = []
    seen: set[str] = set()
    for i, e in enumerate(doc["entries"]):
        if e["hostname"] in seen:
            errors.append(FieldError(f"entries[{i}].hostname", f"duplicate host {e['hostname']!r}"))
        seen.add(e["hostname"])
    entries = tuple(
        sorted(
            (
                ReleaseEntry(
                    e["hostname"], e["store_path"], e["platform"], tuple(e.get("tags", ()))
                )
                for e in doc["entries"]
            ),
            key=lambda e: e.hostname,
        )
    )
    rid = release_id(entries)
    if "id" in doc and doc["id"] != rid:
        errors.append(
            FieldError("id", f"{doc['id']!r} does not match the entries (their id is {rid})")
        )
    if errors:
        raise ValidationError(f"invalid {what}: {len(errors)} error(s)", errors=errors)
    return Release(
        id=rid,
        entries=entries,
        flake_ref=doc.get("flake_ref"),
        flake_rev=doc.get("flake_rev"),
        cache_url=doc.get("cache_url"),
        created_at=parse_time(doc.get("created_at")),
        created_by=doc.get("created_by"),
    )


def release_document(release: Release) -> wire.Release:
    """The JSON/TOML shape of a release; absent values are omitted (TOML has no null)."""
    head: wire.ReleaseHeader = {"id": release.id}
    if release.flake_ref is not None:
        head["flake_ref"] = release.flake_ref
    if release.flake_rev is not None:
        head["flake_rev"] = release.flake_rev
    if release.cache_url is not None:
        head["cache_url"] = release.cache_url
    if release.created_by is not None:
        head["created_by"] = release.created_by
    if release.created_at is not None:
        head["created_at"] = isoformat(release.created_at)
    entries: list[wire.ReleaseEntry] = [
        {
            "hostname": e.hostname,
            "store_path": e.store_path,
            "platform": e.platform,
            "tags": list(e.tags),
        }
        for e in release.entries
    ]
    return {**head, "entries": entries}


# --- TOML files ----------------------------------------------------------------------


def write_toml(release: Release, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{release.id}.toml"
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text(tomli_w.dumps(release_document(release)))
    tmp.replace(path)
    return path


def _toml_line(text: str, field: str) -> int | None:
    """Where a field of a release TOML sits: `entries[2].store_path` -> its line.

    TOML parsers keep no positions, so this follows the layout tomli-w writes
    (top-level keys, then [[entries]] tables); good enough to point at the line.
    """
    m = re.match(r"^entries\[(\d+)\](?:\.(\w+))?", field)
    lines = text.splitlines()
    if m is None:
        key = field.split(".", maxsplit=1)[0].split("[", maxsplit=1)[0]
        for n, line in enumerate(lines, 1):
            if line.lstrip().startswith("["):
                break
            if re.match(rf"^\s*{re.escape(key)}\s*=", line):
                return n
        return None
    index, key = int(m.group(1)), m.group(2)
    headers = [n for n, line in enumerate(lines, 1) if line.strip() == "[[entries]]"]
    if index >= len(headers):
        return None
    start = headers[index]
    end = headers[index + 1] if index + 1 < len(headers) else len(lines) + 1
    if key:
        for n in range(start + 1, end):
            if re.match(rf"^\s*{re.escape(key)}\s*=", lines[n - 1]):
                return n
    return start


def read_toml(path: Path) -> Release:
    """Parse and validate releases/<id>.toml; errors name field and line (exit 7)."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ValidationError(f"cannot read release file {path}: {e.strerror}") from e
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        line = re.search(r"line (\d+)", str(e))
        raise ValidationError(
            f"release file {path} is not valid TOML",
            errors=[FieldError("(document)", str(e), int(line.group(1)) if line else None)],
        ) from e
    try:
        return release_from_document(doc, f"release file {path}")
    except ValidationError as e:
        errors = [FieldError(x.field, x.message, _toml_line(text, x.field)) for x in e.errors]
        raise ValidationError(e.detail, errors=errors) from e


# --- building a release from a flake ----------------------------------------------------

# Applied to nixosConfigurations: tags and platform per selected host, and the
# toplevel outPath when asked (evaluating it instantiates, never builds).
_INFO_EXPR = """hosts: cs: builtins.mapAttrs (name: c:
  let
    cfg = c.config;
    hp = cfg.nixpkgs.hostPlatform or null;
    top = cfg.system.build.toplevel;
  in {
    tags = cfg.services.nixfleet-agent.tags or [];
    platform =
      if builtins.isAttrs hp && hp ? system then hp.system
      else if builtins.isString hp then hp
      else cfg.nixpkgs.system or top.system or "unknown";
    %OUT%
  }) (builtins.intersectAttrs (builtins.listToAttrs
        (map (h: { name = h; value = null; }) hosts)) cs)"""


def public_url(store_url: str) -> str:
    """A push URL without its secret-key parameter: what agents may be told."""
    base, _, query = store_url.partition("?")
    kept = [p for p in query.split("&") if p and not p.startswith("secret-key=")]
    return base + ("?" + "&".join(kept) if kept else "")


@dataclass(frozen=True)
class FlakeSource:
    """Where a release comes from: a flake reference and, when clean, its revision."""

    ref: str
    rev: str | None
    dirty: bool


def local_flake_dir(ref: str) -> Path | None:
    """The directory of a local flake reference (".", "./x", "path:/x", "/x"), else None."""
    for prefix in ("git+file://", "path:", "file://"):
        if ref.startswith(prefix):
            ref = ref[len(prefix) :].split("?", maxsplit=1)[0]
    if ref.startswith((".", "/")) or ref == "":
        return Path(ref or ".").resolve()
    return None


def flake_source(ref: str, *, env: nix.Env = None) -> FlakeSource:
    meta = nix.flake_metadata(ref, env=env)
    rev = meta.get("revision") or meta.get("locked", {}).get("rev")
    dirty_rev = meta.get("dirtyRevision")
    return FlakeSource(ref=ref, rev=rev or dirty_rev, dirty=rev is None)


def select_hosts(all_hosts: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """Hosts matching any glob (web-*, db-01); a pattern matching nothing is an error."""
    if not patterns:
        return sorted(all_hosts)
    chosen: set[str] = set()
    for p in patterns:
        hit = fnmatch.filter(all_hosts, p)
        if not hit:
            raise UsageError(
                f"--hosts {p!r} matches no host of the flake; hosts: {', '.join(sorted(all_hosts))}"
            )
        chosen.update(hit)
    return sorted(chosen)


def _attr(host: str) -> str:
    return json.dumps(host)  # a quoted attribute name survives dots and dashes


def create_release(
    flake: str,
    *,
    hosts: Sequence[str] = (),
    tags: Sequence[str] = (),
    eval_only: bool = False,
    push_to: str | None = None,
    cache_url: str | None = None,
    allow_dirty: bool = False,
    now: datetime,
    env: nix.Env = None,
    progress: Callable[[str], None] = lambda _: None,
) -> Release:
    """Evaluate (and build, and push) the flake's systems into a Release.

    progress receives one line per slow step (evaluating, building, pushing).
    """
    source = flake_source(flake, env=env)
    if source.dirty and not allow_dirty:
        raise UsageError(
            f"flake {flake!r} has uncommitted changes (or is not a git checkout); commit them "
            "so the release records a revision, or pass --allow-dirty"
        )
    progress(f"evaluating {flake}#nixosConfigurations")
    names = nix.eval_json(f"{flake}#nixosConfigurations", apply="builtins.attrNames", env=env)
    if not isinstance(names, list) or not names:
        raise UsageError(f"flake {flake!r} has no nixosConfigurations")
    selected = select_hosts([str(n) for n in names], hosts)
    out_attr = "toplevel = top.outPath;" if eval_only else ""
    expr = _INFO_EXPR.replace("%OUT%", out_attr)
    apply = f"({expr}) (builtins.fromJSON {json.dumps(json.dumps(selected))})"
    info: Mapping[str, Any] = nix.eval_json(f"{flake}#nixosConfigurations", apply=apply, env=env)
    wanted = set(tags)
    selected = [h for h in selected if wanted <= set(info[h]["tags"])]
    if not selected:
        raise UsageError("no host of the flake matches --hosts/--tags")
    if eval_only:
        paths = {h: str(info[h]["toplevel"]) for h in selected}
    else:
        installables = [
            f"{flake}#nixosConfigurations.{_attr(h)}.config.system.build.toplevel" for h in selected
        ]
        progress(f"building {len(selected)} system(s): {', '.join(selected)}")
        built = nix.build(installables, env=env)
        if len(built) != len(selected):
            raise UsageError(f"nix build returned {len(built)} paths for {len(selected)} hosts")
        paths = dict(zip(selected, built, strict=True))
    if push_to:
        progress(f"pushing {len(paths)} closure(s) to {public_url(push_to)}")
        nix.copy_to(push_to, sorted(set(paths.values())), env=env)
    entries = tuple(
        ReleaseEntry(h, paths[h], str(info[h]["platform"]), tuple(sorted(info[h]["tags"])))
        for h in selected
    )
    return Release(
        id=release_id(entries),
        entries=entries,
        flake_ref=flake,
        flake_rev=source.rev,
        cache_url=cache_url or (public_url(push_to) if push_to else None),
        created_at=now,
        created_by=f"{getpass.getuser()}@{socket.gethostname()}",
    )
