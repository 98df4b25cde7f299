"""`nixfleet keys …` and the machine-token commands: credentials over the API (admin).

A new secret goes to stdout alone (so `> file` captures exactly it) and every note
to stderr; nothing else ever prints a secret.
"""

from __future__ import annotations

from pathlib import Path

import click

from nixfleet.cli.config import secret_file
from nixfleet.cli.context import State, pass_state
from nixfleet.cli.options import machine_argument, output_options, secret_output
from nixfleet.cli.output import echo, emit_json, message, table

ROLES = ("readonly", "deploy", "admin")


@click.group()
def keys() -> None:
    """Create, list and revoke operator API keys (needs an admin key).

    Roles nest: readonly (read everything) < deploy (releases, rollouts, desired
    generations) < admin (machines, credentials). The first admin key is made on
    the control-plane host: `nixfleet-control-plane keys create --role admin --name ops`.

    \b
    Example:
      nixfleet keys create --name ci --role deploy --output ci.key
      nixfleet keys list
      nixfleet keys revoke ci
    """


@keys.command("create")
@click.option("--name", required=True, help="Key name, shown in the audit log (e.g. ci).")
@click.option("--role", type=click.Choice(ROLES), required=True, help="What the key may do.")
@secret_output("key")
@output_options()
@pass_state
def create(state: State, name: str, role: str, output: Path | None) -> None:
    """Create an API key; it is shown once: written to --output FILE (0600), else stdout.

    \b
    Example:
      nixfleet keys create --name ci --role deploy --output ~/.config/nixfleet/ci.key
    """
    if output:
        with secret_file(output) as write:
            write(state.client().create_key(name, role)["key"])
        message(f"created {role} key {name!r} in {output} (mode 0600)")
        return
    created = state.client().create_key(name, role)
    if state.json:
        emit_json(created)
        return
    echo(created["key"])
    message(f"created {role} key {name!r}; it is shown once: store it in a 0600 file")


@keys.command("list")
@click.option("--all", "all_", is_flag=True, help="Include revoked keys.")
@output_options()
@pass_state
def list_(state: State, all_: bool) -> None:
    """List API keys by name and role (the keys themselves are never shown again).

    \b
    Example:
      nixfleet keys list --all
    """
    data = state.client().keys(include_revoked=all_)
    if state.json:
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
    state.client().revoke_key(name)
    message(f"revoked key {name!r}")


@click.command("rotate-token")
@machine_argument
@secret_output("token")
@output_options()
@pass_state
def rotate_token(state: State, machine_id: str, output: Path | None) -> None:
    """Issue a new agent token for a machine; the old one stops working at once.

    The new token is shown once (--output FILE, else stdout): install it as the
    agent's token file.

    \b
    Example:
      nixfleet machines rotate-token web-01 --output web-01.token
    """
    if output:
        with secret_file(output) as write:
            write(state.client().rotate_token(machine_id)["token"])
        message(f"{machine_id}: new agent token in {output}; the previous one is revoked")
        return
    out = state.client().rotate_token(machine_id)
    if state.json:
        emit_json(out)
        return
    echo(out["token"])
    message(f"{machine_id}: new agent token above (shown once); the previous one is revoked")


@click.command("revoke-token")
@machine_argument
@pass_state
def revoke_token(state: State, machine_id: str) -> None:
    """Revoke a machine's agent token (its agent gets 401; it may then re-enroll).

    \b
    Example:
      nixfleet machines revoke-token web-01
    """
    out = state.client().revoke_token(machine_id)
    message(f"{machine_id}: " + ("agent token revoked" if out["revoked"] else "had no agent token"))
