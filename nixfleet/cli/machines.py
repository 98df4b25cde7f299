"""`nixfleet machines …`: list, show and change machines."""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from urllib.parse import quote

import click

from nixfleet.cli.context import State, pass_state
from nixfleet.cli.enroll import parse_duration
from nixfleet.cli.output import ago, emit_json, message, printable, short_generation, table
from nixfleet.history import EventKind
from nixfleet.models import Lifecycle, isoformat, utcnow


def _split(value: str | None) -> list[str]:
    return [t.strip() for t in (value or "").split(",") if t.strip()]


def machine_path(machine_id: str, suffix: str = "") -> str:
    return f"/api/v1/machines/{quote(machine_id, safe='')}{suffix}"


def _print_machine(state: State, m: dict[str, Any], json_: bool) -> None:
    if json_ or state.json:
        emit_json(m)
        return
    fields = [
        ("id", m["id"]),
        ("lifecycle", m["lifecycle"]),
        ("tags", ", ".join(m["tags"]) or "-"),
        ("  from agent", ", ".join(m["agent_tags"]) or "-"),
        ("  from operators", ", ".join(m["operator_tags"]) or "-"),
        ("current generation", m["current_generation"] or "-"),
        ("desired generation", m["desired_generation"] or "-"),
        ("desired from", m["desired_source"] or "-"),
        ("sync", m["sync"]),
        ("failed generation", m["failed_generation"] or "-"),
        ("system state", m["system_state"]),
        ("last report", ago(m["last_report_at"]) + (" (stale)" if m["stale"] else "")),
        ("last message", m["last_message"] or "-"),
        ("agent version", m["agent_version"] or "-"),
        ("registered", m["registered_at"]),
    ]
    width = max(len(k) for k, _ in fields)
    for key, value in fields:
        click.echo(f"{key.ljust(width)}  {printable(str(value))}")
    if m.get("health"):
        click.echo("health checks:")
        for r in m["health"]["results"]:
            mark = "ok  " if r["passed"] else "FAIL"
            line = f"  {mark} {r['kind']}:{r['name']} {r.get('message', '')}".rstrip()
            click.echo(printable(line))
    if m.get("history"):
        click.echo("latest history (oldest first; all of it: nixfleet machines history):")
        for e in m["history"]:
            click.echo(printable(f"  {e['at']}  {describe(e)}  [{e['source']}]"))


def describe(e: dict[str, Any]) -> str:
    """One line for a history event (GET /api/v1/machines/{id}/history)."""
    d, kind = e.get("detail") or {}, e["kind"]
    gen, prev = short_generation(e.get("generation")), short_generation(e.get("previous"))
    if kind in ("generation", "desired"):
        return f"{kind} {prev} -> {gen}"
    if kind == "deployment-failed":
        return f"deployment of {gen} failed: {d.get('reason', '')}"
    if kind == "rolled-back":
        return f"deployment of {gen} rolled back: {d.get('reason', '')}"
    if kind == "health":
        text = f"health {d.get('previous')} -> {d.get('status')}"
        if d.get("newly_failing"):
            text += f"; failing: {', '.join(d['newly_failing'])}"
        if d.get("recovered"):
            text += f"; passing again: {', '.join(d['recovered'])}"
        return text
    if kind == "tags":
        changes = [f"+{t}" for t in d.get("added", [])] + [f"-{t}" for t in d.get("removed", [])]
        return f"{d.get('tag_source', '')} tags {' '.join(changes)}"
    if kind == "lifecycle":
        reason = f" ({d['reason']})" if d.get("reason") else ""
        return f"lifecycle {d.get('from')} -> {d.get('to')}{reason}"
    return str(kind)


@click.group()
def machines() -> None:
    """List, inspect and change machines.

    \b
    Example:
      nixfleet machines list --tags prod
      nixfleet machines set-lifecycle web-01 maintenance
    """


@machines.command("list")
@click.option("--tags", help="Only machines carrying ALL these tags (comma-separated).")
@click.option(
    "--lifecycle", type=click.Choice([s.value for s in Lifecycle]), help="Only this state."
)
@click.option("--json", "json_", is_flag=True, help="JSON output.")
@click.option("--wide", is_flag=True, help="Show full store paths.")
@pass_state
def list_(state: State, tags: str | None, lifecycle: str | None, json_: bool, wide: bool) -> None:
    """List machines, optionally filtered by tags and lifecycle.

    \b
    Example:
      nixfleet machines list --tags prod,web --lifecycle active
    """
    data = state.client().get("/api/v1/machines", tag=_split(tags) or None, lifecycle=lifecycle)
    if json_ or state.json:
        emit_json(data)
        return
    rows = [
        [
            m["id"],
            m["lifecycle"],
            short_generation(m["current_generation"], wide),
            ago(m["last_report_at"]),
            ",".join(m["tags"]) or "-",
        ]
        for m in data["machines"]
    ]
    table(["HOST", "LIFECYCLE", "CURRENT", "LAST REPORT", "TAGS"], rows)
    message(f"{len(rows)} machine(s)")


@machines.command()
@click.argument("machine_id")
@click.option("--json", "json_", is_flag=True, help="JSON output.")
@pass_state
def show(state: State, machine_id: str, json_: bool) -> None:
    """Show one machine with its health, ending with its latest history events.

    \b
    Example:
      nixfleet machines show web-01
    """
    _print_machine(state, state.client().get(machine_path(machine_id)), json_)


@machines.command()
@click.argument("machine_id")
@click.option(
    "--since",
    metavar="AGE",
    callback=lambda ctx, param, value: None if value is None else parse_duration(value),
    help="Only events of the last AGE (e.g. 30m, 24h, 7d).",
)
@click.option(
    "--kind",
    "kinds",
    multiple=True,
    type=click.Choice([k.value for k in EventKind]),
    help="Only events of this kind (repeatable).",
)
@click.option("--json", "json_", is_flag=True, help="JSON output (the events, oldest first).")
@pass_state
def history(
    state: State, machine_id: str, since: int | None, kinds: tuple[str, ...], json_: bool
) -> None:
    """Show what happened to a machine: its changes, oldest first (heartbeats are not history).

    \b
    Example:
      nixfleet machines history web-03 --since 7d
      nixfleet machines history web-03 --kind generation --kind rolled-back --json
    """
    start = None if since is None else isoformat(utcnow() - timedelta(seconds=since))
    client, events = state.client(), []
    after: str | None = "0"
    while after is not None:
        page = client.get(
            machine_path(machine_id, "/history"),
            since=start,
            kind=list(kinds) or None,
            after=after,
            limit="1000",
        )
        events.extend(page["events"])
        after = None if page["next_after"] is None else str(page["next_after"])
    if json_ or state.json:
        emit_json(events)
        return
    rows = [[e["at"], e["kind"], e["source"], describe(e)] for e in events]
    table(["TIME", "KIND", "SOURCE", "CHANGE"], rows)
    message(f"{len(rows)} event(s)")


@machines.command()
@click.argument("machine_id")
@click.option("--tags", help="Operator tags (comma-separated).")
@click.option(
    "--lifecycle",
    type=click.Choice(["pending", "provisioning", "active", "maintenance"]),
    default="pending",
    show_default=True,
    help="Initial lifecycle state.",
)
@click.option(
    "--issue-token", is_flag=True, help="Issue the agent token (printed once, to stdout)."
)
@click.option("--json", "json_", is_flag=True, help="JSON output.")
@pass_state
def register(
    state: State, machine_id: str, tags: str | None, lifecycle: str, issue_token: bool, json_: bool
) -> None:
    """Pre-register a machine before its agent first reports.

    \b
    Example:
      nixfleet machines register web-03 --tags prod,web --issue-token > web-03.token
    """
    body = {
        "id": machine_id,
        "tags": _split(tags),
        "lifecycle": lifecycle,
        "issue_token": issue_token,
    }
    m = state.client().post("/api/v1/machines", body)
    if json_ or state.json:
        emit_json(m)
    elif issue_token:
        click.echo(m["token"])
        message(
            f"registered {machine_id}; the token above is shown once: install it on the machine"
        )
    else:
        message(f"registered {machine_id} ({lifecycle})")


@machines.command("set-lifecycle")
@click.argument("machine_id")
@click.argument("lifecycle", type=click.Choice([s.value for s in Lifecycle]))
@pass_state
def set_lifecycle(state: State, machine_id: str, lifecycle: str) -> None:
    """Move a machine to another lifecycle state (invalid transitions exit 4).

    \b
    Example:
      nixfleet machines set-lifecycle web-01 maintenance
    """
    m = state.client().request(
        "PATCH", machine_path(machine_id, "/lifecycle"), {"lifecycle": lifecycle}
    )
    message(f"{machine_id}: {m['lifecycle']}")


@machines.command()
@click.argument("machine_id")
@click.argument("tags", nargs=-1, required=True)
@pass_state
def tag(state: State, machine_id: str, tags: tuple[str, ...]) -> None:
    """Add operator tags to a machine.

    \b
    Example:
      nixfleet machines tag web-01 canary region-eu
    """
    m = state.client().post(
        machine_path(machine_id, "/tags"), {"tags": [t for v in tags for t in _split(v)]}
    )
    message(f"{machine_id}: tags {', '.join(m['tags'])}")


@machines.command()
@click.argument("machine_id")
@click.argument("tags", nargs=-1, required=True)
@pass_state
def untag(state: State, machine_id: str, tags: tuple[str, ...]) -> None:
    """Remove operator tags (tags from the NixOS config come back on the next report).

    \b
    Example:
      nixfleet machines untag web-01 canary
    """
    body = {"tags": [t for v in tags for t in _split(v)]}
    m = state.client().request("DELETE", machine_path(machine_id, "/tags"), body)
    message(f"{machine_id}: tags {', '.join(m['tags']) or '-'}")


@machines.command("set-desired")
@click.argument("machine_id")
@click.argument("store_path")
@click.option("--cache-url", help="Binary cache the agent fetches from.")
@pass_state
def set_desired(state: State, machine_id: str, store_path: str, cache_url: str | None) -> None:
    """Pin a machine's desired generation by hand, outside any rollout.

    \b
    Example:
      nixfleet machines set-desired web-01 /nix/store/...-nixos-system-web-01 --cache-url https://cache.example.com
    """
    body = {"store_path": store_path, "cache_url": cache_url}
    state.client().request("PUT", machine_path(machine_id, "/desired-generation"), body)
    message(f"{machine_id}: desired {store_path}")


@machines.command("clear-desired")
@click.argument("machine_id")
@pass_state
def clear_desired(state: State, machine_id: str) -> None:
    """Clear a machine's desired generation; its agent keeps what it runs.

    \b
    Example:
      nixfleet machines clear-desired web-01
    """
    state.client().request("DELETE", machine_path(machine_id, "/desired-generation"))
    message(f"{machine_id}: desired generation cleared")


@machines.command()
@click.argument("machine_id")
@pass_state
def retry(state: State, machine_id: str) -> None:
    """Let the agent retry a desired generation that failed on it.

    \b
    Example:
      nixfleet machines retry web-01
    """
    state.client().post(machine_path(machine_id, "/retry"))
    message(f"{machine_id}: retry requested; the agent tries again on its next poll")
