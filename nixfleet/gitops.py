"""GitOps: apply every rollout file in --rollouts-dir, at start and whenever one changes.

The background job polls file mtimes (no inotify dependency). Each file is applied
in its own transaction, so an invalid file is recorded (log + `rollout list` shows
it as `invalid` with its errors) without stopping the others. Applying is
idempotent, so applying everything again after a restart changes nothing. A file
refused for reasons outside it (release not registered yet, machines owned by
another running rollout) is retried on every tick until it applies.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from nixfleet import rolloutfile
from nixfleet.errors import FieldError, NixfleetError, ValidationError
from nixfleet.models import utcnow
from nixfleet.settings import Settings
from nixfleet.store import releases, rollout_files
from nixfleet.store import rollouts as store_rollouts
from nixfleet.store.conn import AnyStore

log = logging.getLogger("nixfleet.gitops")

SUFFIXES = (".yaml", ".yml", ".json")
ACTOR = "gitops"
MAX_ERRORS = 100  # per file, as stored for `rollout list`: the first ones say enough


def scan(directory: Path) -> dict[str, int]:
    """Rollout files in the directory (not recursive) -> mtime in ns."""
    out: dict[str, int] = {}
    try:
        entries = sorted(directory.iterdir())
    except OSError as e:
        log.warning("cannot read rollouts dir %s: %s", directory, e)
        return out
    for p in entries:
        if p.suffix in SUFFIXES and p.is_file() and not p.name.startswith("."):
            try:
                out[str(p)] = p.stat().st_mtime_ns
            except OSError:
                continue  # removed between listing and stat
    return out


@dataclass
class Watcher:
    """What this process has seen of one directory: path -> mtime applied (None: retry)."""

    directory: Path
    seen: dict[str, int | None] = field(default_factory=dict)
    last_error: dict[str, str] = field(default_factory=dict)


def _name_of(path: Path) -> str:
    """The file's `name:` when it can be read at all, else its stem (for listings)."""
    return rolloutfile.read_name(path) or path.stem


def apply_file(store: AnyStore, path: Path, mtime_ns: int, poll_hint: int) -> bool:
    """Apply one file; record the outcome. True when it need not be retried."""
    now = utcnow()
    name = _name_of(path)
    try:
        rf = rolloutfile.load(path)
        doc, release = rolloutfile.with_release_id(rf)
        with store.transaction() as conn:
            if release is not None:
                releases.insert(conn, release, now, ACTOR)
            applied = store_rollouts.apply(conn, doc, ACTOR, now, poll_hint, source=f"file:{path}")
            rollout_files.record_file(
                conn, str(path), now, name=name, rollout_id=applied.id, mtime_ns=mtime_ns
            )
        if applied.created:
            log.info("applied rollout file %s: rollout %s (%s)", path, name, applied.id)
        return True
    except NixfleetError as e:
        errors = list(e.errors[:MAX_ERRORS]) or [FieldError("(document)", e.detail)]
        if len(e.errors) > MAX_ERRORS:
            more = len(e.errors) - MAX_ERRORS
            errors.append(FieldError("(document)", f"... and {more} more error(s)"))
        with store.transaction() as conn:
            rollout_files.record_file(
                conn, str(path), now, name=name, rollout_id=None, errors=errors, mtime_ns=mtime_ns
            )
        log.warning("rollout file %s not applied: %s", path, str(e).replace("\n", " "))
        # A file that is itself invalid waits for an edit; anything else may clear up.
        return isinstance(e, ValidationError)


def sync(store: AnyStore, watcher: Watcher, poll_hint: int) -> None:
    current = scan(watcher.directory)
    for path, mtime in current.items():
        if watcher.seen.get(path) == mtime:
            continue
        done = apply_file(store, Path(path), mtime, poll_hint)
        watcher.seen[path] = mtime if done else None
    gone = set(watcher.seen) - set(current)
    for path in gone:
        del watcher.seen[path]
    if gone or not watcher.seen:
        with store.transaction() as conn:
            rollout_files.forget_files(conn, current)


_WATCHERS: dict[tuple[str, str], Watcher] = {}
_LOCK = threading.Lock()


def job(settings: Settings, store: AnyStore) -> None:
    """The background job (controlplane.background.JOBS); idle without --rollouts-dir."""
    if not settings.rollouts_dir:
        return
    key = (settings.rollouts_dir, settings.database.display)
    with _LOCK:
        watcher = _WATCHERS.setdefault(key, Watcher(Path(settings.rollouts_dir)))
    sync(store, watcher, settings.rollout_poll_hint)
