"""`nixfleet config …`: contexts (one per fleet) and the effective configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from nixfleet.cli import config
from nixfleet.cli.context import State, pass_state
from nixfleet.cli.options import output_options
from nixfleet.cli.output import echo, emit_json, message, table
from nixfleet.client import check_url


def _context_names(ctx: click.Context, param: Any, incomplete: str) -> list[str]:
    try:
        names = config.contexts(config.load_file())
    except Exception:  # completion must never print an error into the prompt
        return []
    return [n for n in sorted(names) if n.startswith(incomplete)]


@click.group("config")
def config_group() -> None:
    """Contexts (one control plane and key file each) and the effective configuration.

    The config file is $NIXFLEET_CONFIG, else $XDG_CONFIG_HOME/nixfleet/config.toml.
    Flags beat a context named with --context/NIXFLEET_CONTEXT, which beats the
    environment, which beats the current context.

    \b
    Example:
      nixfleet config set-context prod --control-plane-url https://fleet.example.com \\
        --api-key-file ~/.config/nixfleet/prod.key
      nixfleet config use-context prod
      nixfleet config get-contexts
      nixfleet config view
    """


@config_group.command("set-context")
@click.argument("name")
@click.option("--control-plane-url", metavar="URL", help="The context's control plane URL.")
@click.option(
    "--api-key-file",
    metavar="FILE",
    help="File holding the context's API key (mode 0600; the key itself is never stored).",
)
def set_context(name: str, control_plane_url: str | None, api_key_file: str | None) -> None:
    """Create or change a context; the first one made becomes current.

    \b
    Example:
      nixfleet config set-context staging --control-plane-url http://10.0.0.5:8470 \\
        --api-key-file ~/.config/nixfleet/staging.key
    """
    if control_plane_url:
        check_url(control_plane_url)
    if api_key_file and not api_key_file.startswith("~"):
        api_key_file = str(Path(api_key_file).absolute())  # the same file from any directory
    path = config.set_context(
        name, {"control_plane_url": control_plane_url, "api_key_file": api_key_file}
    )
    message(f"context {name} saved in {path}")


@config_group.command("use-context")
@click.argument("name", shell_complete=_context_names)
def use_context(name: str) -> None:
    """Make NAME the current context (the default of every later command).

    \b
    Example:
      nixfleet config use-context prod
    """
    config.use_context(name)
    message(f"switched to context {name}")


@config_group.command("delete-context")
@click.argument("name", shell_complete=_context_names)
def delete_context(name: str) -> None:
    """Remove a context from the config file (its key file stays where it is).

    \b
    Example:
      nixfleet config delete-context old-lab
    """
    config.delete_context(name)
    message(f"deleted context {name}")


@config_group.command("current-context")
@pass_state
def current_context(state: State) -> None:
    """Print the context in use (after --context and NIXFLEET_CONTEXT).

    \b
    Example:
      nixfleet config current-context
    """
    name = state.config(read_key=False).context
    if name is None:
        message("no context in use; create one with `nixfleet config set-context NAME`")
        raise click.exceptions.Exit(1)
    echo(name)


@config_group.command("get-contexts")
@output_options()
@pass_state
def get_contexts(state: State) -> None:
    """List the contexts of the config file; `*` marks the one in use.

    \b
    Example:
      nixfleet config get-contexts
    """
    data = config.load_file()
    found = config.contexts(data)
    in_use = state.config(read_key=False).context
    if state.json:
        emit_json(
            {
                "current_context": in_use,
                "contexts": [{"name": n, **found[n]} for n in sorted(found)],
            }
        )
        return
    if not found:
        message(
            f"no contexts in {config.config_path()}; create one with "
            "`nixfleet config set-context NAME --control-plane-url URL --api-key-file FILE`"
        )
        return
    rows = [
        [
            "*" if n == in_use else "",
            n,
            str(found[n].get("control_plane_url", "-")),
            str(found[n].get("api_key_file", "-")),
        ]
        for n in sorted(found)
    ]
    table(["CURRENT", "NAME", "CONTROL PLANE", "API KEY FILE"], rows)


def mask(secret: str | None) -> str | None:
    """Enough to tell keys apart, never enough to use one: nfk_ab…(40 chars)."""
    if not secret:
        return None
    return f"{secret[:6]}…({len(secret)} chars)"


@config_group.command("view")
@output_options()
@pass_state
def view(state: State) -> None:
    """Print the effective configuration and where each value comes from (keys masked).

    \b
    Example:
      nixfleet config view
      nixfleet --context staging config view --json
    """
    cfg = state.config()
    doc = {
        "config_file": str(cfg.path),
        "context": cfg.context,
        "control_plane_url": cfg.control_plane_url,
        "control_plane_url_from": cfg.url_source,
        "api_key": mask(cfg.api_key),
        "api_key_from": cfg.key_source,
    }
    if state.json:
        emit_json(doc)
        return
    width = max(len(k) for k in doc)
    for key, value in doc.items():
        echo(f"{key.ljust(width)}  {value if value is not None else '-'}")
