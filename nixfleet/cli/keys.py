"""`nixfleet keys …` and the machine-token commands: credentials over the API (admin).

A new secret goes to stdout alone (so `> file` captures exactly it) and every note
to stderr; nothing else ever prints a secret.
"""

from __future__ import annotations

from urllib.parse import quote

import click

from nixfleet.cli.context import State, pass_state
from nixfleet.cli.machines import machine_path
from nixfleet.cli.output import emit_json, message, table

ROLES = ("readonly", "deploy", "admin")


@click.group()
def keys() -> None:
    """Create, list and revoke operator API keys (needs an admin key).

    Roles nest: readonly (read everything) < deploy (releases, rollouts, desired
    generations) < admin (machines, credentials). The first admin key is made on
    the control-plane host: `nixfleet-control-plane keys create --role admin --name ops`.

    \b
    Example:
      nixfleet keys create --name ci --role deploy > ci.key
      nixfleet keys list
      nixfleet keys revoke ci
    """


@keys.command("create")
@click.option("--name", required=True, help="Key name, shown in the audit log (e.g. ci).")
@click.option("--role", type=click.Choice(ROLES), required=True, help="What the key may do.")
@click.option("--json", "json_", is_flag=True, help="JSON output (includes the key).")
@pass_state
def create(state: State, name: str, role: str, json_: bool) -> None:
    """Create an API key; it is printed once, to stdout.

    \b
    Example:
      (umask 077; nixfleet keys create --name ci --role deploy > ~/.config/nixfleet/ci.key)
    """
    created = state.client().post("/api/v1/keys", {"name": name, "role": role})
    if json_ or state.json:
        emit_json(created)
        return
    click.echo(created["key"])
    message(f"created {role} key {name!r}; it is shown once: store it in a 0600 file")


@keys.command("list")
@click.option("--all", "all_", is_flag=True, help="Include revoked keys.")
@click.option("--json", "json_", is_flag=True, help="JSON output.")
@pass_state
def list_(state: State, all_: bool, json_: bool) -> None:
    """List API keys by name and role (the keys themselves are never shown again).

    \b
    Example:
      nixfleet keys list --all
    """
    data = state.client().get("/api/v1/keys", all="true" if all_ else None)
    if json_ or state.json:
        emit_json(data)
        return
    rows = [
        [k["name"], k["role"], k["created_at"], k["created_by"], k["revoked_at"] or "-"]
        for k in data["keys"]
    ]
    table(["NAME", "ROLE", "CREATED", "CREATED BY", "REVOKED"], rows)


@keys.command("revoke")
@click.argument("name")
@pass_state
def revoke(state: State, name: str) -> None:
    """Revoke an API key; it is refused (401) from its next request on.

    \b
    Example:
      nixfleet keys revoke ci
    """
    state.client().request("DELETE", f"/api/v1/keys/{quote(name, safe='')}")
    message(f"revoked key {name!r}")


@click.command("rotate-token")
@click.argument("machine_id")
@click.option("--json", "json_", is_flag=True, help="JSON output (includes the token).")
@pass_state
def rotate_token(state: State, machine_id: str, json_: bool) -> None:
    """Issue a new agent token for a machine; the old one stops working at once.

    The new token is printed once, to stdout: install it as the agent's token file.

    \b
    Example:
      (umask 077; nixfleet machines rotate-token web-01 > web-01.token)
    """
    out = state.client().post(machine_path(machine_id, "/token"))
    if json_ or state.json:
        emit_json(out)
        return
    click.echo(out["token"])
    message(f"{machine_id}: new agent token above (shown once); the previous one is revoked")


@click.command("revoke-token")
@click.argument("machine_id")
@pass_state
def revoke_token(state: State, machine_id: str) -> None:
    """Revoke a machine's agent token (its agent gets 401; it may then re-enroll).

    \b
    Example:
      nixfleet machines revoke-token web-01
    """
    out = state.client().request("DELETE", machine_path(machine_id, "/token"))
    message(f"{machine_id}: " + ("agent token revoked" if out["revoked"] else "had no agent token"))
