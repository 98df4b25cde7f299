"""`nixfleet release …`: build releases from a flake, register, list, show, diff, delete."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from nixfleet import wire
from nixfleet.cli import complete
from nixfleet.cli.context import State, pass_state
from nixfleet.cli.options import HOST_LIST, output_options, tags_option
from nixfleet.cli.output import echo, emit_json, message, short_generation, table
from nixfleet.models import utcnow

if TYPE_CHECKING:
    from nixfleet.models import Release

# nixfleet.flake (and jsonschema, tomli_w behind it) is imported where it is used:
# `--help` and shell completion, which load every command, start faster.


def register_release(state: State, release: Release) -> wire.RegisteredRelease:
    """POST a release; the same entries again are idempotent (same id)."""
    from nixfleet import flake

    return state.client().register_release(flake.release_document(release))


def _print_entries(release: Release, wide: bool = False) -> None:
    table(
        ["HOST", "PLATFORM", "STORE PATH", "TAGS"],
        [
            [e.hostname, e.platform, short_generation(e.store_path, wide), ",".join(e.tags) or "-"]
            for e in release.entries
        ],
    )


@click.group()
def release() -> None:
    """Build, register and inspect releases (one system closure per host).

    \b
    Example:
      nixfleet release create --flake . --tags prod --push-to s3://cache
      nixfleet release list
    """


@release.command()
@click.option("--flake", "flake_ref", default=".", show_default=True, help="Flake reference.")
@click.option(
    "--hosts",
    type=HOST_LIST,
    default="",
    help="Only these hosts; globs allowed (comma-separated): 'web-*,db-01'.",
)
@tags_option("Only hosts whose services.nixfleet-agent.tags include ALL of these.")
@click.option("--eval-only", is_flag=True, help="Evaluate store paths without building.")
@click.option("--push-to", metavar="URL", help="`nix copy --to URL` the closures (a cache).")
@click.option("--cache-url", metavar="URL", help="Where agents fetch from (default: --push-to).")
@click.option("--out", type=click.Path(file_okay=False), help="Directory for <id>.toml.")
@click.option("--dry-run", is_flag=True, help="Evaluate only; write, push and register nothing.")
@click.option("--allow-dirty", is_flag=True, help="Allow uncommitted changes in the flake.")
@click.option("--no-register", is_flag=True, help="Write the TOML but do not contact the CP.")
@output_options()
@pass_state
def create(
    state: State,
    flake_ref: str,
    hosts: list[str],
    tags: list[str],
    eval_only: bool,
    push_to: str | None,
    cache_url: str | None,
    out: str | None,
    dry_run: bool,
    allow_dirty: bool,
    no_register: bool,
) -> None:
    """Build every nixosConfigurations host of a flake into a release.

    Evaluates the flake's hosts (tags from services.nixfleet-agent.tags, platform
    from nixpkgs.hostPlatform), builds each config.system.build.toplevel, writes
    releases/<id>.toml next to the flake and registers the release with the control
    plane. The id is a hash of the entries: the same systems give the same release.
    Prints the release id on stdout.

    \b
    Example:
      nixfleet release create --flake . --hosts 'web-*' --push-to https://cache.example.com
      REL=$(nixfleet release create --eval-only --no-register)
    """
    import tomli_w

    from nixfleet import flake

    release = flake.create_release(
        flake_ref,
        hosts=hosts,
        tags=tags,
        eval_only=eval_only or dry_run,
        push_to=None if dry_run else push_to,
        cache_url=cache_url or (push_to if dry_run else None),
        allow_dirty=allow_dirty,
        now=utcnow(),
        progress=message,
    )
    if dry_run:
        if state.json:
            emit_json(flake.release_document(release))
        else:
            click.echo(tomli_w.dumps(flake.release_document(release)), nl=False)
            message(
                f"dry run: release {release.id} ({len(release.entries)} hosts); nothing written"
            )
        return
    local = flake.local_flake_dir(flake_ref)
    directory = Path(out) if out else (local or Path.cwd()) / "releases"
    path = flake.write_toml(release, directory)
    message(f"wrote {path}")
    for e in release.entries:
        message(f"  {e.hostname:<20} {e.platform:<14} {e.store_path}")
    if not no_register:
        created = register_release(state, release)["created"]
        message(f"{'registered' if created else 'already registered:'} release {release.id}")
    if state.json:
        emit_json(flake.release_document(release))
    else:
        echo(release.id)


@release.command("register")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@pass_state
def register_(state: State, file: Path) -> None:
    """Register a release TOML file with the control plane (idempotent).

    \b
    Example:
      nixfleet release register releases/rel-3f2a9c1d7e4b.toml
    """
    from nixfleet import flake

    rel = flake.read_toml(file)
    created = register_release(state, rel)["created"]
    message(f"{'registered' if created else 'already registered:'} release {rel.id}")
    echo(rel.id)


@release.command("list")
@output_options()
@pass_state
def list_(state: State) -> None:
    """List releases, newest first.

    \b
    Example:
      nixfleet release list
    """
    data = state.client().releases()
    if state.json:
        emit_json(data)
        return
    if not data["releases"]:
        message("no releases yet: build one with `nixfleet release create --flake .`")
        return
    rows = [
        [
            r["id"],
            r["created_at"],
            "pruned" if r.get("pruned_at") else str(r["hosts"]),
            (r["flake_rev"] or "-")[:12],
            str(r["rollouts"]),
            r["created_by"],
        ]
        for r in data["releases"]
    ]
    table(["ID", "CREATED", "HOSTS", "REV", "ROLLOUTS", "BY"], rows)


release_argument = click.argument("release_id", shell_complete=complete.release_items)


@release.command()
@release_argument
@output_options(wide=True)
@pass_state
def show(state: State, release_id: str) -> None:
    """Show one release and its entries.

    \b
    Example:
      nixfleet release show rel-3f2a9c1d7e4b --wide
    """
    data = state.client().release(release_id)
    if state.json:
        emit_json(data)
        return
    for key in ("id", "flake_ref", "flake_rev", "cache_url", "created_at", "created_by"):
        echo(f"{key:<11} {data.get(key) or '-'}")
    echo()
    from nixfleet import flake

    _print_entries(flake.release_from_document(dict(data)), state.wide)


@release.command()
@click.argument("a", shell_complete=complete.release_items)
@click.argument("b", shell_complete=complete.release_items)
@output_options(wide=True)
@pass_state
def diff(state: State, a: str, b: str) -> None:
    """Per host: what changes from release A to release B.

    \b
    Example:
      nixfleet release diff rel-3f2a9c1d7e4b rel-9d0e1f2a3b4c
    """
    data = state.client().release_diff(a, b)
    if state.json:
        emit_json(data)
        return
    wide = state.wide
    rows = [
        ["+", d["hostname"], "-", short_generation(d["store_path"], wide)] for d in data["added"]
    ]
    rows += [
        ["-", d["hostname"], short_generation(d["store_path"], wide), "-"] for d in data["removed"]
    ]
    rows += [
        ["~", d["hostname"], short_generation(d["from"], wide), short_generation(d["to"], wide)]
        for d in data["changed"]
    ]
    table(["", "HOST", a, b], sorted(rows, key=lambda r: r[1]))
    message(
        f"{len(data['added'])} added, {len(data['removed'])} removed, "
        f"{len(data['changed'])} changed, {len(data['unchanged'])} unchanged"
    )


@release.command()
@release_argument
@pass_state
def delete(state: State, release_id: str) -> None:
    """Delete a release (refused while a rollout references it; exit 4).

    \b
    Example:
      nixfleet release delete rel-3f2a9c1d7e4b
    """
    state.client().delete_release(release_id)
    message(f"deleted release {release_id}")
