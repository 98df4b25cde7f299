"""`nixfleet-control-plane`: serve the API, or manage keys directly on the host."""

from __future__ import annotations

import logging
import sys

import click

from nixfleet.controlplane import config
from nixfleet.errors import NixfleetError
from nixfleet.models import utcnow
from nixfleet.store import Store, audit, credentials


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config", "config_file", type=click.Path(dir_okay=False), help="Settings JSON file."
)
@click.option("--listen", help="HOST:PORT to listen on (default 127.0.0.1:8470).")
@click.option(
    "--db", help="SQLite database file (default: $STATE_DIRECTORY or ~/.local/state/nixfleet)."
)
@click.option(
    "--rollouts-dir", type=click.Path(file_okay=False), help="Apply rollout files from DIR."
)
@click.option(
    "--admin-key-file", type=click.Path(dir_okay=False), help="Install this admin key at start."
)
@click.option(
    "--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"])
)
@click.pass_context
def cli(
    ctx: click.Context,
    config_file: str | None,
    listen: str | None,
    db: str | None,
    rollouts_dir: str | None,
    admin_key_file: str | None,
    log_level: str,
) -> None:
    """Run the nixfleet control plane (API + reconciler) on one SQLite file.

    \b
    Example:
      nixfleet-control-plane --listen 127.0.0.1:8470 --db /var/lib/nixfleet/nixfleet.db
      nixfleet-control-plane --db fleet.db keys create --role admin --name ops
    """
    logging.basicConfig(
        level=log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = config.load(
            config_file,
            listen=listen,
            db=db,
            rollouts_dir=rollouts_dir,
            admin_key_file=admin_key_file,
        )
    except NixfleetError as e:
        raise click.UsageError(str(e)) from e
    ctx.obj = settings
    if ctx.invoked_subcommand is None:
        from nixfleet.controlplane.server import serve

        serve(settings)


@cli.group()
def keys() -> None:
    """Manage operator API keys directly in the database (run on the control-plane host)."""


@keys.command("create")
@click.option("--name", required=True, help="Key name, e.g. ops.")
@click.option("--role", type=click.Choice(credentials.ROLES), default="admin", show_default=True)
@click.pass_obj
def keys_create(settings: config.Settings, name: str, role: str) -> None:
    """Create a key and print it once (stdout).

    \b
    Example:
      nixfleet-control-plane --db /var/lib/nixfleet/nixfleet.db keys create --role admin --name ops
    """
    store = Store(settings.db_path())
    now = utcnow()
    try:
        with store.transaction() as conn:
            key = credentials.create_key(conn, name, role, "host", now)
            audit.record(conn, "host:cli", "key.create", name, now, {"role": role})
    except NixfleetError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    click.echo(key)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
