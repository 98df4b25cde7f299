"""`nixfleet machines …`: list, show and change machines."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import click

from nixfleet.cli.context import State, pass_state
from nixfleet.cli.output import ago, emit_json, message, printable, short_generation, table
from nixfleet.models import Lifecycle


def _yes_no(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


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
        ("needs reboot", _yes_no(m.get("needs_reboot"))),
        ("booted generation", m.get("booted_generation") or "-"),
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
    if m.get("recent_reports"):
        click.echo("recent reports:")
        for r in m["recent_reports"][:10]:
            ok = "ok  " if r["success"] else "FAIL"
            line = (
                f"  {r['received_at']}  {ok} {short_generation(r['current_generation'])}  "
                f"{r['message']}".rstrip()
            )
            click.echo(printable(line))


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
    """Show one machine with its health and recent reports.

    \b
    Example:
      nixfleet machines show web-01
    """
    _print_machine(state, state.client().get(machine_path(machine_id)), json_)


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
