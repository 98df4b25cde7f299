"""Dynamic shell completion: machine ids, tags, rollout names, release ids from the CP.

A shell waits on every TAB, so the control plane gets a short deadline and answers
are cached for a little while ($XDG_CACHE_HOME/nixfleet/complete-*.json, 0600, per
control-plane URL). When the CP is slow or down, the last cached answer (however
old) or nothing is offered: completion never prints an error into the prompt.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from typing import Any

import click
from click.shell_completion import CompletionItem

from nixfleet.cli import config
from nixfleet.client import Client
from nixfleet.errors import NixfleetError

TIMEOUT = 1.0  # seconds the shell may wait for the control plane
FRESH = 30.0  # seconds a cached answer is used without asking again

Completer = Callable[[click.Context], list[str]]


def _config(ctx: click.Context) -> config.CliConfig:
    p = ctx.find_root().params
    return config.resolve(
        p.get("control_plane_url"), p.get("api_key"), p.get("api_key_file"), p.get("context_name")
    )


def _fetch(ctx: click.Context, kind: str, ask: Callable[[Client], list[str]]) -> list[str]:
    try:
        cfg = _config(ctx)
    except NixfleetError:
        return []
    digest = hashlib.sha256(f"{cfg.control_plane_url}\0{kind}".encode()).hexdigest()[:16]
    path = config.cache_dir() / f"complete-{digest}.json"
    cached: list[str] | None = None
    try:
        cached = [str(v) for v in json.loads(path.read_text())]
        if time.time() - path.stat().st_mtime < FRESH:
            return cached
    except (OSError, ValueError, TypeError):
        cached = None
    try:
        with Client(cfg.control_plane_url, cfg.api_key, timeout=TIMEOUT) as client:
            values = ask(client)
    except NixfleetError:
        return cached or []
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f"{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(values, f)
        tmp.replace(path)
    except OSError:
        pass
    return values


def machines(ctx: click.Context) -> list[str]:
    return _fetch(ctx, "machines", lambda c: [m["id"] for m in c.machines()["machines"]])


def tags(ctx: click.Context) -> list[str]:
    return _fetch(
        ctx, "tags", lambda c: sorted({t for m in c.machines()["machines"] for t in m["tags"]})
    )


def rollouts(ctx: click.Context) -> list[str]:
    def ask(c: Client) -> list[str]:
        names = [r["name"] for r in c.rollouts()["rollouts"] if r["name"] and r["id"]]
        return list(dict.fromkeys(names))  # newest first, each name once

    return _fetch(ctx, "rollouts", ask)


def releases(ctx: click.Context) -> list[str]:
    return _fetch(ctx, "releases", lambda c: [r["id"] for r in c.releases()["releases"]])


def _items(completer: Completer) -> Callable[..., list[CompletionItem]]:
    def complete(ctx: click.Context, param: Any, incomplete: str) -> list[CompletionItem]:
        return [CompletionItem(v) for v in completer(ctx) if v.startswith(incomplete)]

    return complete


machine_items = _items(machines)
tag_items = _items(tags)
rollout_items = _items(rollouts)
release_items = _items(releases)
