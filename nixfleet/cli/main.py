"""The `nixfleet` group, its global options, and the one place errors become exit codes."""

from __future__ import annotations

import sys

import click

from nixfleet import __version__, entrypoint
from nixfleet.cli import config
from nixfleet.cli.context import State, pass_state
from nixfleet.cli.options import output_options
from nixfleet.cli.output import COLOR_MODES, message, set_color
from nixfleet.errors import NixfleetError, UnreachableError

__all__ = ["State", "cli", "main", "pass_state", "run"]

CP_DOWN_GUIDANCE = """\
While the control plane is down:
  - agents keep running their last-known generation;
  - agents receive no new deployments until it is back;
  - inspect machines directly: ssh root@<host>, then
    `nixos-rebuild list-generations` and `systemctl status`."""


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--control-plane-url",
    metavar="URL",
    help="Control plane URL, e.g. http://127.0.0.1:8470 "
    "[env NIXFLEET_CONTROL_PLANE_URL; default http://127.0.0.1:8470].",
)
@click.option("--api-key", metavar="KEY", help="Operator API key [env NIXFLEET_API_KEY].")
@click.option(
    "--api-key-file",
    metavar="FILE",
    help="Read the API key from FILE (mode 0600) [env NIXFLEET_API_KEY_FILE].",
)
@click.option(
    "--context",
    "context_name",
    metavar="NAME",
    help="Use this context of the config file (see `nixfleet config`) [env NIXFLEET_CONTEXT].",
)
@output_options()
@click.option(
    "--color",
    type=click.Choice(COLOR_MODES),
    default="auto",
    show_default=True,
    help="Colour tables: auto = on a terminal unless NO_COLOR is set (non-empty).",
)
@click.option("--debug", is_flag=True, help="On an error, print the Python traceback too.")
@click.version_option(__version__, prog_name="nixfleet")
@pass_state
def cli(
    state: State,
    control_plane_url: str | None,
    api_key: str | None,
    api_key_file: str | None,
    context_name: str | None,
    color: str,
    debug: bool,
) -> None:
    """nixfleet: declarative fleet management for NixOS.

    \b
    Example:
      export NIXFLEET_CONTROL_PLANE_URL=https://fleet.example.com
      nixfleet status
      nixfleet --context staging machines list --tags prod
      nixfleet --color never status | less
      nixfleet --debug machines show web-01    # a traceback with any error
    """
    state.url_flag = control_plane_url
    state.key_flag = api_key
    state.key_file_flag = api_key_file
    state.context_flag = context_name
    state.debug = debug
    set_color(color)


def _register() -> None:
    from nixfleet.cli import (
        audit,
        completion,
        contexts,
        demo,
        enroll,
        keys,
        machines,
        release,
        rollout,
        status,
        webhooks,
    )

    for command in (
        status.status,
        machines.machines,
        keys.keys,
        enroll.enroll_tokens,
        audit.audit,
        release.release,
        rollout.rollout,
        rollout.deploy,
        contexts.config_group,
        completion.completion,
        demo.demo,
        webhooks.webhooks,
    ):
        cli.add_command(command)
    machines.machines.add_command(keys.rotate_token)
    machines.machines.add_command(keys.revoke_token)


_register()


def _guidance(e: NixfleetError) -> None:
    if isinstance(e, UnreachableError):
        message(CP_DOWN_GUIDANCE)


def run(argv: list[str] | None = None) -> int:
    """Run one command; return its exit code (the CLI's one place for that)."""
    state = State()
    return entrypoint.run(
        cli,
        argv,
        "nixfleet",
        obj=state,
        debug=lambda: state.debug,
        bug_traceback=False,
        after_error=_guidance,
    )


def main(argv: list[str] | None = None) -> None:
    if config.completion_requested():
        cli.main(args=argv, prog_name="nixfleet")  # click's completion protocol; exits
    sys.exit(run(argv))
