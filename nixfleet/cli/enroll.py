"""`nixfleet enroll-tokens …`: tokens that let new agents enroll themselves (admin)."""

from __future__ import annotations

import re
from pathlib import Path

import click

from nixfleet.cli.config import secret_file
from nixfleet.cli.context import State, pass_state
from nixfleet.cli.options import output_options, secret_output, tags_option
from nixfleet.cli.output import echo, emit_json, message, table

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: str) -> int:
    """'90s', '30m', '24h', '7d', '2w' or plain seconds -> seconds."""
    match = re.fullmatch(r"\s*(\d{1,9})\s*([smhdw]?)\s*", value)
    if not match:
        raise click.BadParameter(f"{value!r}: use e.g. 30m, 24h, 7d or a number of seconds")
    return int(match.group(1)) * UNITS[match.group(2) or "s"]


def _duration(ctx: click.Context, param: click.Parameter, value: str) -> int:
    return parse_duration(value)


@click.group("enroll-tokens")
def enroll_tokens() -> None:
    """Create, list and revoke enrollment tokens (needs an admin key).

    An agent configured with an enrollment token exchanges it once for its own
    machine token (POST /api/v1/enroll); the machine is registered as pending
    with the token's preset tags. Tokens are limited in uses and expire.

    \b
    Example:
      nixfleet enroll-tokens create --uses 10 --expires 24h --tags prod --hostname-glob 'web-*'
      nixfleet enroll-tokens list
      nixfleet enroll-tokens revoke et-1a2b3c4d5e6f
    """


@enroll_tokens.command("create")
@click.option(
    "--uses",
    type=click.IntRange(1, 100_000),
    default=1,
    show_default=True,
    help="How many machines may enroll with it.",
)
@click.option(
    "--expires",
    callback=_duration,
    default="24h",
    show_default=True,
    help="Lifetime: 30m, 24h, 7d … (at most 366d).",
)
@tags_option("Preset operator tags for enrolled machines (comma-separated).")
@click.option("--hostname-glob", metavar="GLOB", help="Only hostnames matching GLOB, e.g. 'web-*'.")
@secret_output("token")
@output_options()
@pass_state
def create(
    state: State,
    uses: int,
    expires: int,
    tags: list[str],
    hostname_glob: str | None,
    output: Path | None,
) -> None:
    """Create an enrollment token; it is shown once: --output FILE (0600), else stdout.

    \b
    Example:
      nixfleet enroll-tokens create --uses 5 --expires 2h --tags prod --output enroll.token
    """
    client = state.client()
    if output:
        with secret_file(output) as write:
            created = client.create_enroll_token(uses, expires, tags, hostname_glob)
            write(created["token"])
        message(f"created enrollment token {created['id']} in {output} (mode 0600)")
        return
    created = client.create_enroll_token(uses, expires, tags, hostname_glob)
    if state.json:
        emit_json(created)
        return
    echo(created["token"])
    message(
        f"created enrollment token {created['id']} ({uses} use(s), expires "
        f"{created['expires_at']}); it is shown once"
    )


@enroll_tokens.command("list")
@output_options()
@pass_state
def list_(state: State) -> None:
    """List enrollment tokens with uses left, expiry and state (never the secrets).

    \b
    Example:
      nixfleet enroll-tokens list --json
    """
    data = state.client().enroll_tokens()
    if state.json:
        emit_json(data)
        return
    rows = [
        [
            t["id"],
            t["state"],
            f"{t['uses_left']}/{t['uses_total']}",
            t["expires_at"],
            ",".join(t["tags"]) or "-",
            t["hostname_glob"] or "*",
        ]
        for t in data["enroll_tokens"]
    ]
    table(["ID", "STATE", "USES LEFT", "EXPIRES", "TAGS", "HOSTNAMES"], rows)


@enroll_tokens.command("revoke")
@click.argument("token_id")
@pass_state
def revoke(state: State, token_id: str) -> None:
    """Revoke an enrollment token; machines that already enrolled are not affected.

    \b
    Example:
      nixfleet enroll-tokens revoke et-1a2b3c4d5e6f
    """
    state.client().revoke_enroll_token(token_id)
    message(f"revoked enrollment token {token_id}")
