"""`nixfleet status`: desired vs current generation for every machine."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TypeVar

import click

from nixfleet import wire
from nixfleet.cli.context import State, pass_state
from nixfleet.cli.options import output_options, tags_option
from nixfleet.cli.output import ago, echo, emit_json, message, short_generation, table
from nixfleet.errors import UnreachableError
from nixfleet.models import Sync

SYNC_COLORS = {
    Sync.IN_SYNC.value: {"fg": "green"},
    Sync.UPDATING.value: {"fg": "yellow"},
    Sync.FAILED.value: {"fg": "red", "bold": True},
    Sync.NO_DESIRED.value: {"dim": True},
}
T = TypeVar("T")


def poll(fetch: Callable[[], T], interval: float) -> T:
    """fetch(), retried through control-plane blips (said once per outage, on stderr).

    For the commands that follow something (--watch, --wait): a CP restart must not
    end a watch or fail a CI job that waits for a rollout. Ctrl-C ends it (exit 130).
    """
    down_since: float | None = None
    while True:
        try:
            result = fetch()
        except UnreachableError as e:
            if down_since is None:
                down_since = time.monotonic()
                message(f"control plane unreachable, retrying every {interval:g}s… ({e.detail})")
            time.sleep(interval)
            continue
        if down_since is not None:
            message(f"control plane is back (after {time.monotonic() - down_since:.0f}s)")
        return result


def empty_fleet_hint(tags: list[str]) -> str:
    if tags:
        return (
            f"no machine carries all of the tags {','.join(tags)}; "
            "`nixfleet machines list` shows every machine and its tags"
        )
    return (
        "no machines yet. Register one (`nixfleet machines register HOST --issue-token`), "
        "or let agents enroll (`nixfleet enroll-tokens create`); "
        "see docs/quickstart.md"
    )


def render(data: wire.Status, wide: bool) -> None:
    rows = []
    for m in data["machines"]:
        last = ago(m["last_report_at"])
        if m["stale"] and m["last_report_at"]:
            last += " (stale)"
        rows.append(
            [
                m["id"],
                m["lifecycle"],
                short_generation(m["current_generation"], wide),
                short_generation(m["desired_generation"], wide),
                m["sync"] + (" NEEDS REBOOT" if m.get("needs_reboot") else ""),
                last,
                ",".join(m["tags"]) or "-",
            ]
        )
    table(
        ["HOST", "LIFECYCLE", "CURRENT", "DESIRED", "SYNC", "LAST REPORT", "TAGS"],
        rows,
        colors={4: lambda cell: SYNC_COLORS.get(cell.removesuffix(" NEEDS REBOOT"), {})},
    )
    echo("\n" + summary_line(data["summary"]))


def summary_line(s: wire.Summary) -> str:
    parts = [f"{s['in_sync']}/{s['total']} machines in sync"]
    counts = (
        (s["updating"], "updating"),
        (s["failed"], "failed"),
        (s["no_desired"], "no desired"),
        (s["stale"], "stale"),
    )
    parts += [f"{n} {label}" for n, label in counts if n]
    return ", ".join(parts)


def fresh_fleet_hint(s: wire.Summary) -> str | None:
    if s["total"] and s["no_desired"] == s["total"]:
        return (
            "no machine has a desired generation yet: build a release "
            "(`nixfleet release create --flake .`) and roll it out "
            "(`nixfleet deploy --release rel-…`)"
        )
    return None


def _signature(data: wire.Status) -> object:
    """What a non-TTY watch reprints on: everything but the ticking times."""
    return [
        (m["id"], m["lifecycle"], m["current_generation"], m["desired_generation"], m["sync"],
         m["stale"], tuple(m["tags"]))
        for m in data["machines"]
    ]  # fmt: skip


@click.command()
@output_options(wide=True)
@tags_option("Only machines carrying all these tags (comma-separated).")
@click.option(
    "--watch",
    is_flag=True,
    help="Redraw every --interval seconds until Ctrl-C; survives control-plane restarts.",
)
@click.option(
    "--interval", default=2.0, show_default=True, help="Seconds between polls with --watch."
)
@pass_state
def status(state: State, tags: list[str], watch: bool, interval: float) -> None:
    """Desired vs current generation of every machine, and a summary.

    Columns: HOST, LIFECYCLE, CURRENT (from the agent's most recent report),
    DESIRED (from the active rollout's release entry, if any), SYNC, LAST
    REPORT (marked stale past the control plane's threshold) and TAGS. Not on a
    terminal, --watch prints the table again only when something changed.

    \b
    Example:
      nixfleet status
      nixfleet status --tags prod,web --watch --interval 5
      nixfleet status --json | jq '.machines[] | select(.sync != "in sync")'
    """
    client = state.client()
    tty = sys.stdout.isatty()
    last: object = None
    while True:
        data = poll(lambda: client.status(tags), interval) if watch else client.status(tags)
        if state.json:
            emit_json(data)
        elif not data["machines"]:
            if not watch or last is None:
                message(empty_fleet_hint(tags))
            last = []
        elif tty or _signature(data) != last:
            if watch and tty:
                click.clear()
            render(data, state.wide)
            hint = fresh_fleet_hint(data["summary"])
            if hint and not watch:
                message(hint)
            last = _signature(data)
        if not watch:
            return
        time.sleep(interval)
