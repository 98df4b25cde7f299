"""`nixfleet-control-plane migrate-db`: the SQLite database copied into PostgreSQL.

Thin (DESIGN §2 rule 1): the two URLs parsed by nixfleet.database_url, the copy by
store.migrate_db (imported only here and only when run: psycopg is an optional extra),
the tables copied rendered, one line each, on stdout.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from nixfleet import database_url
from nixfleet.database_url import DatabaseURL
from nixfleet.entrypoint import Program
from nixfleet.errors import ServiceError, ValidationError


def _url(text: str, option: str, backend: str) -> DatabaseURL:
    """`text` parsed, or the usage error naming `option` (exit 2)."""
    try:
        url = database_url.parse(text)
    except ValidationError as e:
        raise click.BadParameter(
            "; ".join(x.message for x in e.errors) or e.detail, param_hint=option
        ) from e
    if url.backend != backend:
        want = "sqlite:PATH (or a file path)" if backend == "sqlite" else "postgresql://…"
        raise click.BadParameter(f"expected {want}, not {url.display}", param_hint=option)
    return url


@click.command("migrate-db", cls=Program, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--from",
    "source",
    required=True,
    metavar="sqlite:PATH",
    help="The control plane's SQLite database (read only).",
)
@click.option(
    "--to",
    "target",
    required=True,
    metavar="postgresql://USER@HOST/DB",
    help="A new, empty PostgreSQL database; no password in the URL (passfile=, or peer).",
)
def command(source: str, target: str) -> None:
    """Copy the SQLite database into a new PostgreSQL database, all or nothing.

    Stop the control plane first: what it writes after the copy began is not copied.
    The SQLite file must be migrated to this version (start this version's control
    plane on it once); the target must be empty (it is migrated here). Every table is
    copied in one transaction and committed only when the row counts agree; the
    tables copied and their rows are listed on stdout.

    \b
    Example:
      nixfleet-control-plane migrate-db --from sqlite:/var/lib/nixfleet/nixfleet.db \\
        --to 'postgresql://nixfleet@/nixfleet?host=/run/postgresql'
    """
    src = _url(source, "--from", "sqlite")
    dst = _url(target, "--to", "postgresql")
    assert src.path is not None and dst.conninfo is not None
    try:
        from nixfleet.store import migrate_db
    except ImportError as e:
        raise ServiceError(
            f"migrate-db needs the PostgreSQL driver ({e.name}); install nixfleet with "
            "its `postgresql` extra (psycopg, psycopg_pool)"
        ) from e
    started = time.monotonic()
    copied = migrate_db.migrate(Path(src.path), dst.conninfo)
    width = max(len(c.table) for c in copied)
    for c in copied:
        click.echo(f"{c.table:<{width}}  {c.rows:>10}  {c.seconds:7.2f} s")
    click.echo(
        f"migrated {src.display} to {dst.display}: {sum(c.rows for c in copied)} rows in "
        f"{len(copied)} tables, {time.monotonic() - started:.1f} s",
        err=True,
    )
