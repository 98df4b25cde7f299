"""The `nixfleet` group, its global options, and the one place errors become exit codes."""

from __future__ import annotations

import sys

import click

from nixfleet import __version__
from nixfleet.cli.context import State, pass_state
from nixfleet.cli.output import message
from nixfleet.errors import NixfleetError, UnreachableError

__all__ = ["State", "cli", "main", "pass_state"]

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
    help="Control plane URL [env NIXFLEET_CONTROL_PLANE_URL; default http://127.0.0.1:8470].",
)
@click.option("--api-key", metavar="KEY", help="Operator API key [env NIXFLEET_API_KEY].")
@click.option(
    "--api-key-file",
    metavar="FILE",
    help="Read the API key from FILE (mode 0600) [env NIXFLEET_API_KEY_FILE].",
)
@click.option("--json", "json_", is_flag=True, help="Machine-readable JSON output everywhere.")
@click.version_option(__version__, prog_name="nixfleet")
@click.pass_context
def cli(
    ctx: click.Context,
    control_plane_url: str | None,
    api_key: str | None,
    api_key_file: str | None,
    json_: bool,
) -> None:
    """nixfleet: declarative fleet management for NixOS.

    \b
    Example:
      export NIXFLEET_CONTROL_PLANE_URL=https://fleet.example.com
      nixfleet status
      nixfleet machines list --tags prod
    """
    ctx.obj = State(control_plane_url, api_key, api_key_file, json_)


def _register() -> None:
    from nixfleet.cli import (
        audit,
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
        demo.demo,
        webhooks.webhooks,
    ):
        cli.add_command(command)
    machines.machines.add_command(keys.rotate_token)
    machines.machines.add_command(keys.revoke_token)


_register()


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="nixfleet", standalone_mode=False)
    except click.exceptions.Abort:
        message("aborted")
        sys.exit(1)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except NixfleetError as e:
        message(f"error: {e}")
        if isinstance(e, UnreachableError):
            message(CP_DOWN_GUIDANCE)
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    sys.exit(0)
