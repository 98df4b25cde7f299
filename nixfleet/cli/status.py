"""`nixfleet status`: desired vs current generation for every machine."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import click

from nixfleet import gcpause, wire
from nixfleet.cli.context import State, pass_state
from nixfleet.cli.options import filter_options, output_options
from nixfleet.cli.output import (
    ColumnStyles,
    Style,
    ago,
    echo,
    emit_json,
    message,
    short_generation,
    table,
)
from nixfleet.errors import UnreachableError
from nixfleet.filters import MachineFilter
from nixfleet.models import Health, Sync

HEALTH_COLORS: dict[str, Style] = {
    Health.HEALTHY.value: {"fg": "green"},
    Health.FAILING.value: {"fg": "red", "bold": True},
    Health.UNKNOWN.value: {"dim": True},
}
SYNC_COLORS: dict[str, Style] = {
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


def empty_fleet_hint(tags: Sequence[str], filtered: bool = False) -> str:
    if tags:
        return (
            f"no machine carries all of the tags {','.join(tags)}; "
            "`nixfleet machines list` shows every machine and its tags"
        )
    if filtered:
        return "no machine matches these filters; `nixfleet status` shows them all"
    return (
        "no machines yet. Register one (`nixfleet machines register HOST --issue-token`), "
        "or let agents enroll (`nixfleet enroll-tokens create`); "
        "see docs/quickstart.md"
    )


STATUS_HEADERS = [
    "HOST",
    "LIFECYCLE",
    "CURRENT",
    "DESIRED",
    "SYNC",
    "HEALTH",
    "LAST REPORT",
    "TAGS",
]
STATUS_COLORS: ColumnStyles = {
    4: lambda cell: SYNC_COLORS.get(cell.removesuffix(" NEEDS REBOOT"), {}),
    5: lambda cell: HEALTH_COLORS.get(cell, {}),
}


def status_row(m: wire.StatusMachine | wire.Machine, wide: bool) -> list[str]:
    """One machine as `status` and `machines list` show it (STATUS_HEADERS)."""
    last = ago(m["last_report_at"])
    if m["stale"] and m["last_report_at"]:
        last += " (stale)"
    return [
        m["id"],
        m["lifecycle"],
        short_generation(m["current_generation"], wide),
        short_generation(m["desired_generation"], wide),
        m["sync"] + (" NEEDS REBOOT" if m.get("needs_reboot") else ""),
        m["health_status"],
        last,
        ",".join(m["tags"]) or "-",
    ]


def status_table(
    machines: Sequence[wire.StatusMachine | wire.Machine], wide: bool, headers: bool = True
) -> None:
    table(STATUS_HEADERS, [status_row(m, wide) for m in machines], STATUS_COLORS, headers)


def render(data: wire.Status, wide: bool, headers: bool = True) -> None:
    status_table(data["machines"], wide, headers)
    if headers:
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
    by_health = s["by_health"]
    health = [f"{by_health[h.value]} {h.value}" for h in Health if by_health.get(h.value)]
    if not by_health.get(Health.HEALTHY.value) and not by_health.get(Health.FAILING.value):
        health = []  # no machine runs health checks: nothing to say
    return ", ".join(parts) + (f"; health: {', '.join(health)}" if health else "")


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
         m["health_status"], m["stale"], tuple(m["tags"]))
        for m in data["machines"]
    ]  # fmt: skip


@click.command()
@output_options(wide=True)
@filter_options
@click.option("--no-headers", is_flag=True, help="Rows only: no header line, no summary.")
@click.option(
    "--watch",
    is_flag=True,
    help="Redraw every --interval seconds until Ctrl-C; survives control-plane restarts.",
)
@click.option(
    "--interval", default=2.0, show_default=True, help="Seconds between polls with --watch."
)
@pass_state
def status(
    state: State, machine_filter: MachineFilter, no_headers: bool, watch: bool, interval: float
) -> None:
    """Desired vs current generation and health of every machine, and a summary.

    Columns: HOST, LIFECYCLE, CURRENT (from the agent's most recent report),
    DESIRED (from the active rollout's release entry, if any), SYNC, HEALTH
    (healthy, failing, unknown: the agent's health checks), LAST REPORT (marked
    stale past the control plane's threshold) and TAGS. HOST (optional) is a glob
    (`'web-*'`) or a part of the host name. Not on a terminal, --watch prints the
    table again only when something changed.

    \b
    Example:
      nixfleet status
      nixfleet status 'web-*' --tags prod,!canary --sync failed
      nixfleet status --health failing --sort last-report --no-headers
      nixfleet status --tags prod,web --watch --interval 5
      nixfleet status --json | jq '.machines[] | select(.sync != "in sync")'
    """
    # One answer: its ~1.3 million objects (100,000 machines) hold no cycles, and are
    # freed before the collector is back, which would only walk them (~0.1 s).
    with contextlib.nullcontext() if watch else gcpause.paused():
        _status(state, machine_filter, no_headers, watch, interval)


def _status(
    state: State, machine_filter: MachineFilter, no_headers: bool, watch: bool, interval: float
) -> None:
    client = state.client()
    f = machine_filter
    filtered = f.selects_some
    tty = sys.stdout.isatty()
    last: object = None
    while True:
        data = poll(lambda: client.status(f), interval) if watch else client.status(f)
        if state.json:
            emit_json(data)
        elif not data["machines"]:
            if not watch or last is None:
                message(empty_fleet_hint(f.tags, filtered))
            last = []
        elif tty or _signature(data) != last:
            if watch and tty:
                click.clear()
            render(data, state.wide, not no_headers)
            hint = fresh_fleet_hint(data["summary"])
            if hint and not watch and not filtered:
                message(hint)
            last = _signature(data)
        if not watch:
            return
        time.sleep(interval)
