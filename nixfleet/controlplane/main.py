"""`nixfleet-control-plane`: serve the API, or manage keys directly on the host."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

import click

from nixfleet import settings as config
from nixfleet.controlplane import migrate_db
from nixfleet.entrypoint import ProgramGroup
from nixfleet.errors import NixfleetError
from nixfleet.models import utcnow
from nixfleet.secretfile import secret_file
from nixfleet.store import Store, audit, credentials, open_store


@click.group(
    "nixfleet-control-plane",
    cls=ProgramGroup,
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.option(
    "--config", "config_file", type=click.Path(dir_okay=False), help="Settings JSON file."
)
@click.option("--listen", help="HOST:PORT to listen on (default 127.0.0.1:8470).")
@click.option(
    "--db", help="SQLite database file (default: $STATE_DIRECTORY or ~/.local/state/nixfleet)."
)
@click.option(
    "--database-url",
    help="sqlite:PATH (as --db) or postgresql://USER@HOST/DB; no password in it.",
)
@click.option(
    "--rollouts-dir", type=click.Path(file_okay=False), help="Apply rollout files from DIR."
)
@click.option(
    "--admin-key-file", type=click.Path(dir_okay=False), help="Install this admin key at start."
)
@click.option(
    "--reconcile-interval",
    type=float,
    help="Seconds between reconciler ticks (default 2).",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    help="Server processes (default 1); one per core for large fleets.",
)
@click.option(
    "--init",
    is_flag=True,
    help="Start a new, empty fleet even in an existing empty (0-byte) database file.",
)
@click.option(
    "--log-level",
    default="info",
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="Log verbosity (stderr); secrets are never logged.",
)
@click.pass_context
def cli(
    ctx: click.Context,
    config_file: str | None,
    listen: str | None,
    db: str | None,
    database_url: str | None,
    rollouts_dir: str | None,
    admin_key_file: str | None,
    reconcile_interval: float | None,
    workers: int | None,
    init: bool,
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
            database_url=database_url,
            rollouts_dir=rollouts_dir,
            admin_key_file=admin_key_file,
            reconcile_interval=reconcile_interval,
            workers=workers,
        )
    except NixfleetError as e:
        raise click.UsageError(str(e)) from e
    ctx.obj = settings
    if ctx.invoked_subcommand is None:
        from nixfleet.controlplane.server import serve

        serve(settings, init=init)


@cli.group()
def keys() -> None:
    """Manage operator API keys directly in the database (run on the control-plane host).

    \b
    Example:
      nixfleet-control-plane --db /var/lib/nixfleet/nixfleet.db keys create --name ops
      nixfleet-control-plane --db /var/lib/nixfleet/nixfleet.db keys list
    """


@keys.command("create")
@click.option("--name", required=True, help="Key name, e.g. ops.")
@click.option(
    "--role",
    type=click.Choice(credentials.ROLES),
    default="admin",
    show_default=True,
    help="readonly < deploy < admin.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the key to this new file (mode 0600) instead of stdout.",
)
@click.pass_obj
def keys_create(settings: config.Settings, name: str, role: str, output: Path | None) -> None:
    """Create a key and show it once: in --output FILE (0600), else on stdout.

    \b
    Example:
      nixfleet-control-plane --db /var/lib/nixfleet/nixfleet.db keys create --name ops -o ops.key
    """
    with contextlib.ExitStack() as stack:
        write = stack.enter_context(secret_file(output)) if output else click.echo
        store = stack.enter_context(contextlib.closing(open_store(settings.database)))
        now = utcnow()
        with store.transaction() as conn:
            key = credentials.create_key(conn, name, role, "host", now)
            audit.record(conn, "host:cli", "key.create", name, now, {"role": role})
        write(key)
    if output:
        click.echo(f"created {role} key {name!r} in {output} (mode 0600)", err=True)


@keys.command("list")
@click.option("--all", "all_", is_flag=True, help="Include revoked keys.")
@click.pass_obj
def keys_list(settings: config.Settings, all_: bool) -> None:
    """List keys by name and role (never the keys themselves).

    \b
    Example:
      nixfleet-control-plane --db /var/lib/nixfleet/nixfleet.db keys list --all
    """
    with contextlib.closing(open_store(settings.database)) as store, store.read() as conn:
        found = credentials.list_keys(conn, include_revoked=all_)
    for k in found:
        state = f"revoked {k.revoked_at}" if k.revoked_at else "active"
        click.echo(f"{k.name}\t{k.role}\t{k.created_at}\t{k.created_by}\t{state}")


@keys.command("revoke")
@click.argument("name")
@click.pass_obj
def keys_revoke(settings: config.Settings, name: str) -> None:
    """Revoke a key at once, including the last admin key (the host can always make another).

    \b
    Example:
      nixfleet-control-plane --db /var/lib/nixfleet/nixfleet.db keys revoke ops
    """
    now = utcnow()
    with contextlib.closing(open_store(settings.database)) as store, store.transaction() as conn:
        credentials.revoke_key(conn, name, now)
        audit.record(conn, "host:cli", "key.revoke", name, now)
    click.echo(f"revoked key {name!r}", err=True)


@cli.command()
@click.argument("destination", type=click.Path(dir_okay=False))
@click.pass_obj
def backup(settings: config.Settings, destination: str) -> None:
    """Write a consistent copy of the database while the control plane runs.

    Uses SQLite's VACUUM INTO: one transactionally consistent, compacted file,
    safe to take while agents report. Restore by stopping the control plane and
    putting the copy in place of the database file.

    \b
    Example:
      nixfleet-control-plane --db /var/lib/nixfleet/nixfleet.db backup /backup/fleet.db
    """
    if settings.database.path is None:
        raise NixfleetError(
            "backup copies an SQLite file; back up PostgreSQL with "
            "pg_dump --format=custom (docs/scaling.md, Operations)"
        )
    target = Path(destination)
    if target.exists():
        raise NixfleetError(f"{target} exists; choose a new file name")
    store = Store(settings.db_path())
    store.backup(target)
    store.close()
    click.echo(f"backed up {settings.db_path()} to {target}", err=True)


@cli.command("wait-ready")
@click.option(
    "--timeout",
    type=click.FloatRange(0, 3600),
    default=60.0,
    show_default=True,
    help="Seconds to wait before giving up (exit 5).",
)
@click.pass_obj
def wait_ready(settings: config.Settings, timeout: float) -> None:
    """Wait until the control plane at --listen answers GET /ready with 200.

    /ready is 200 once the database is migrated and takes a real write; the NixOS
    module runs this as the unit's ExecStartPost, so `systemctl start` (and a
    `nixos-rebuild switch`) finishes only when the control plane is ready.
    Exit 0 when ready, 5 (naming the last answer) when not within the timeout.

    \b
    Example:
      nixfleet-control-plane --listen 127.0.0.1:8470 wait-ready --timeout 30
    """
    from nixfleet.controlplane.readiness import wait_until_ready

    host, port = settings.host_port
    wait_until_ready(host, port, timeout)
    click.echo(f"control plane at {settings.listen} is ready", err=True)


cli.add_command(migrate_db.command)


def main() -> None:
    cli()  # ProgramGroup.main: the one place exceptions become exit codes


if __name__ == "__main__":
    main()
