"""`nixfleet status`: desired vs current generation for every machine."""

from __future__ import annotations

import time
from typing import Any

import click

from nixfleet.cli.context import State, pass_state
from nixfleet.cli.output import ago, emit_json, short_generation, table
from nixfleet.models import Sync

SYNC_COLORS = {
    Sync.IN_SYNC.value: {"fg": "green"},
    Sync.UPDATING.value: {"fg": "yellow"},
    Sync.FAILED.value: {"fg": "red", "bold": True},
    Sync.NO_DESIRED.value: {"dim": True},
}


def render(data: dict[str, Any], wide: bool) -> None:
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
    s = data["summary"]
    parts = [f"{s['in_sync']}/{s['total']} machines in sync"]
    for key, label in (("updating", "updating"), ("failed", "failed"), ("stale", "stale")):
        if s[key]:
            parts.append(f"{s[key]} {label}")
    click.echo("\n" + ", ".join(parts))


@click.command()
@click.option("--json", "json_", is_flag=True, help="Full JSON: store paths, RFC 3339 times.")
@click.option("--wide", is_flag=True, help="Show full store paths.")
@click.option("--tags", help="Only machines carrying all these tags (comma-separated).")
@click.option("--watch", is_flag=True, help="Redraw every 2 seconds until interrupted.")
@pass_state
def status(state: State, json_: bool, wide: bool, tags: str | None, watch: bool) -> None:
    """Desired vs current generation of every machine, and a summary.

    Columns: HOST, LIFECYCLE, CURRENT (from the agent's most recent report),
    DESIRED (from the active rollout's release entry, if any), SYNC, LAST
    REPORT (marked stale past the control plane's threshold) and TAGS.

    \b
    Example:
      nixfleet status
      nixfleet status --json | jq '.machines[] | select(.sync != "in sync")'
    """
    params = {"tag": [t for t in (tags or "").split(",") if t] or None}
    while True:
        data = state.client().get("/api/v1/status", **params)
        if json_ or state.json:
            emit_json(data)
        else:
            if watch:
                click.clear()
            render(data, wide)
        if not watch:
            return
        time.sleep(2)
