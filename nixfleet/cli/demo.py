"""`nixfleet demo`: watch a fleet converge, on real Nix, in about a minute."""

from __future__ import annotations

from pathlib import Path

import click

from nixfleet.cli.config import child_env
from nixfleet.cli.output import message
from nixfleet.errors import ValidationError


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
@click.option(
    "--database-url",
    metavar="postgresql://…",
    help="Run the control planes on this (empty) PostgreSQL database instead of SQLite.",
)
@click.option(
    "--replicas",
    type=click.IntRange(1, 5),
    help="Control-plane replicas on the one database [default: 2 with --database-url, else 1].",
)
def demo(
    machines: int, root: Path | None, keep: bool, database_url: str | None, replicas: int | None
) -> None:
    """Run a demo fleet: control plane, signed cache, agents, releases and rollouts.

    Everything is real: an embedded control plane on a SQLite file (or replicas on
    PostgreSQL, with --database-url: one of them leads the rollouts), a binary cache
    signed with a fresh key and served on 127.0.0.1, one nixfleet-agent process per
    machine with its own system profile, releases built from a small flake by Nix.
    A canary rollout of a good release completes; a bad release is caught by the
    canary (rolled back on the machine, rollout paused). Needs Nix on PATH.

    \b
    Example:
      nixfleet demo
      nixfleet demo --machines 6 --keep
      nixfleet demo --database-url 'postgresql:///demo?host=/run/postgresql'
    """
    from nixfleet import demo as demo_lib  # when used: --help and completion start faster
    from nixfleet.database_url import parse

    if database_url is not None:
        try:
            if parse(database_url).backend != "postgresql":
                raise click.BadParameter("expected postgresql://…", param_hint="--database-url")
        except ValidationError as e:
            raise click.BadParameter(e.errors[0].message, param_hint="--database-url") from e
    if replicas is None:
        replicas = 2 if database_url else 1
    elif replicas > 1 and not database_url:
        raise click.BadParameter(
            "several replicas need a shared PostgreSQL database (--database-url)",
            param_hint="--replicas",
        )
    demo_lib.run(root, machines, keep, child_env(), message, click.echo, database_url, replicas)
