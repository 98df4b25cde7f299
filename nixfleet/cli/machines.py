"""`nixfleet machines …`: list, show and change machines."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import click

from nixfleet import wire
from nixfleet.cli import complete
from nixfleet.cli.context import State, pass_state
from nixfleet.cli.enroll import parse_duration
from nixfleet.cli.options import (
    filter_options,
    machine_argument,
    output_options,
    secret_output,
    split_list,
    tags_option,
)
from nixfleet.cli.output import (
    ago,
    duration,
    echo,
    emit_json,
    message,
    printable,
    short_generation,
    table,
)
from nixfleet.cli.status import empty_fleet_hint, status_table
from nixfleet.filters import MachineFilter
from nixfleet.history import EventKind
from nixfleet.models import Lifecycle, isoformat, utcnow
from nixfleet.secretfile import secret_file

OUTPUT_LINES = 40  # of a failed switch's output in `machines show` (all of it in --json)


def _yes_no(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def _print_machine(m: wire.MachineDetail) -> None:
    uptime = m.get("uptime_seconds")
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
        ("uptime", f"{duration(uptime)} (at the last report)" if uptime is not None else "-"),
        ("last message", m["last_message"] or "-"),
        ("agent version", m["agent_version"] or "-"),
        ("registered", m["registered_at"]),
    ]
    width = max(len(k) for k, _ in fields)
    for key, value in fields:
        echo(f"{key.ljust(width)}  {printable(str(value))}")
    health = m.get("health")
    if health and health["results"]:
        echo("health checks:")
        for check in health["results"]:
            mark = "ok  " if check["passed"] else "FAIL"
            line = f"  {mark} {check['kind']}:{check['name']} {check.get('message', '')}".rstrip()
            echo(printable(line))
    elif health:
        echo(f"{'health checks'.ljust(width)}  none configured")
    output = m.get("failed_output")
    if output:
        echo(f"switch output of the failed generation (last {OUTPUT_LINES} lines):")
        for line in output.splitlines()[-OUTPUT_LINES:]:
            echo("  " + printable(line))
    if m.get("history"):
        echo("latest history (oldest first; all of it: nixfleet machines history):")
        for e in m["history"]:
            echo(printable(f"  {e['at']}  {describe(e)}  [{e['source']}]"))


def describe(e: wire.HistoryEvent) -> str:
    """One line for a history event."""
    d, kind = e["detail"], e["kind"]
    gen, prev = short_generation(e["generation"]), short_generation(e["previous"])
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
    if kind == "reboot-needed":
        booted = f" (booted {short_generation(d['booted'])})" if d.get("booted") else ""
        return f"reboot needed to run {gen}{booted}"
    if kind == "rebooted":
        return f"rebooted {short_generation(d.get('previous'))} -> {gen}"
    return kind


@click.group()
def machines() -> None:
    """List, inspect and change machines.

    \b
    Example:
      nixfleet machines list --tags prod
      nixfleet machines set-lifecycle web-01 maintenance
    """


@machines.command("list")
@filter_options
@output_options(wide=True)
@click.option("--no-headers", is_flag=True, help="Rows only: no header line, no count.")
@pass_state
def list_(state: State, machine_filter: MachineFilter, no_headers: bool) -> None:
    """List machines (the columns of `nixfleet status`), filtered as `status` filters.

    \b
    Example:
      nixfleet machines list --tags prod,web --lifecycle active
      nixfleet machines list 'db-*' --sync failed
    """
    f = machine_filter
    data = state.client().machines(f=f)
    if state.json:
        emit_json(data)
        return
    if not data["machines"]:
        if f.lifecycle and f == MachineFilter(
            lifecycle=f.lifecycle, sort=f.sort, descending=f.descending
        ):
            message(f"no {f.lifecycle.value} machines; `nixfleet machines list` shows them all")
        else:
            message(
                empty_fleet_hint(f.tags, f != MachineFilter(sort=f.sort, descending=f.descending))
            )
        return
    status_table(data["machines"], state.wide, not no_headers)
    if not no_headers:
        message(f"{len(data['machines'])} machine(s)")


@machines.command()
@machine_argument
@output_options()
@pass_state
def show(state: State, machine_id: str) -> None:
    """Show one machine with its health, uptime and latest history events.

    \b
    Example:
      nixfleet machines show web-01
    """
    m = state.client().machine(machine_id)
    if state.json:
        emit_json(m)
    else:
        _print_machine(m)


@machines.command()
@machine_argument
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
@output_options()
@pass_state
def history(state: State, machine_id: str, since: int | None, kinds: tuple[str, ...]) -> None:
    """Show what happened to a machine: its changes, oldest first (heartbeats are not history).

    \b
    Example:
      nixfleet machines history web-03 --since 7d
      nixfleet machines history web-03 --kind generation --kind rolled-back --json
    """
    start = None if since is None else isoformat(utcnow() - timedelta(seconds=since))
    client, events = state.client(), []
    after: int | None = 0
    while after is not None:
        page = client.machine_history(machine_id, start, kinds, after)
        events.extend(page["events"])
        after = page["next_after"]
    if state.json:
        emit_json(events)
        return
    rows = [[e["at"], e["kind"], e["source"], describe(e)] for e in events]
    table(["TIME", "KIND", "SOURCE", "CHANGE"], rows)
    message(f"{len(rows)} event(s)")


@machines.command()
@click.argument("machine_id")
@tags_option("Operator tags (comma-separated).")
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
@secret_output("agent token (with --issue-token)")
@output_options()
@pass_state
def register(
    state: State,
    machine_id: str,
    tags: list[str],
    lifecycle: str,
    issue_token: bool,
    output: Path | None,
) -> None:
    """Pre-register a machine before its agent first reports.

    \b
    Example:
      nixfleet machines register web-03 --tags prod,web --issue-token -o web-03.token
    """
    if output and not issue_token:
        raise click.UsageError("--output is for the token: add --issue-token")
    if output:
        with secret_file(output) as write:
            m = state.client().register_machine(machine_id, tags, lifecycle, True)
            write(m.get("token", ""))
        message(f"registered {machine_id}; its agent token is in {output} (mode 0600)")
        return
    m = state.client().register_machine(machine_id, tags, lifecycle, issue_token)
    if state.json:
        emit_json(m)
    elif issue_token:
        echo(m.get("token", ""))
        message(
            f"registered {machine_id}; the token above is shown once: install it on the machine"
        )
    else:
        message(f"registered {machine_id} ({lifecycle})")


@machines.command("set-lifecycle")
@machine_argument
@click.argument("lifecycle", type=click.Choice([s.value for s in Lifecycle]))
@pass_state
def set_lifecycle(state: State, machine_id: str, lifecycle: str) -> None:
    """Move a machine to another lifecycle state (invalid transitions exit 4).

    \b
    Example:
      nixfleet machines set-lifecycle web-01 maintenance
    """
    m = state.client().set_lifecycle(machine_id, lifecycle)
    message(f"{machine_id}: {m['lifecycle']}")


def _tag_words(words: tuple[str, ...]) -> list[str]:
    return [t for w in words for t in split_list(w)]


@machines.command()
@machine_argument
@click.argument("tags", nargs=-1, required=True, shell_complete=complete.tag_items)
@pass_state
def tag(state: State, machine_id: str, tags: tuple[str, ...]) -> None:
    """Add operator tags to a machine.

    \b
    Example:
      nixfleet machines tag web-01 canary region-eu
    """
    m = state.client().add_tags(machine_id, _tag_words(tags))
    message(f"{machine_id}: tags {', '.join(m['tags'])}")


@machines.command()
@machine_argument
@click.argument("tags", nargs=-1, required=True, shell_complete=complete.tag_items)
@pass_state
def untag(state: State, machine_id: str, tags: tuple[str, ...]) -> None:
    """Remove operator tags. A tag from the machine's NixOS config
    (services.nixfleet-agent.tags) cannot be removed here: exit 4, change the config.

    \b
    Example:
      nixfleet machines untag web-01 canary
    """
    m = state.client().remove_tags(machine_id, _tag_words(tags))
    message(f"{machine_id}: tags {', '.join(m['tags']) or '-'}")


@machines.command("set-desired")
@machine_argument
@click.argument("store_path")
@click.option("--cache-url", help="Binary cache the agent fetches from.")
@pass_state
def set_desired(state: State, machine_id: str, store_path: str, cache_url: str | None) -> None:
    """Pin a machine's desired generation by hand, outside any rollout.

    \b
    Example:
      nixfleet machines set-desired web-01 /nix/store/...-nixos-system-web-01 --cache-url https://cache.example.com
    """
    state.client().set_desired(machine_id, store_path, cache_url)
    message(f"{machine_id}: desired {store_path}")


@machines.command("clear-desired")
@machine_argument
@pass_state
def clear_desired(state: State, machine_id: str) -> None:
    """Clear a machine's desired generation; its agent keeps what it runs.

    \b
    Example:
      nixfleet machines clear-desired web-01
    """
    state.client().clear_desired(machine_id)
    message(f"{machine_id}: desired generation cleared")


@machines.command()
@machine_argument
@pass_state
def retry(state: State, machine_id: str) -> None:
    """Let the agent retry a desired generation that failed on it.

    \b
    Example:
      nixfleet machines retry web-01
    """
    state.client().retry(machine_id)
    message(f"{machine_id}: retry requested; the agent tries again on its next poll")
