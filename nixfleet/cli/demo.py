"""`nixfleet demo`: watch a fleet converge, on real Nix, in about a minute."""

from __future__ import annotations

from pathlib import Path

import click

from nixfleet.cli.config import child_env
from nixfleet.cli.output import message


@click.command()
@click.option(
    "--machines",
    default=4,
    show_default=True,
    type=click.IntRange(2, 20),
    help="How many simulated machines (one real agent process each).",
)
@click.option(
    "--dir",
    "root",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep the demo's files here (default: a temporary directory).",
)
@click.option("--keep", is_flag=True, help="Leave the fleet running and print how to explore it.")
def demo(machines: int, root: Path | None, keep: bool) -> None:
    """Run a demo fleet: control plane, signed cache, agents, releases and rollouts.

    Everything is real: an embedded control plane on a SQLite file, a binary cache
    signed with a fresh key and served on 127.0.0.1, one nixfleet-agent process per
    machine with its own system profile, releases built from a small flake by Nix.
    A canary rollout of a good release completes; a bad release is caught by the
    canary (rolled back on the machine, rollout paused). Needs Nix on PATH.

    \b
    Example:
      nixfleet demo
      nixfleet demo --machines 6 --keep
    """
    from nixfleet import demo as demo_lib  # when used: --help and completion start faster

    demo_lib.run(root, machines, keep, child_env(), message, click.echo)
