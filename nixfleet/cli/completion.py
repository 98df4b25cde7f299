"""`nixfleet completion bash|zsh|fish`: the shell's completion script.

Commands and options complete from the Click tree; machine ids, tags, rollout names
and release ids from the control plane (nixfleet.cli.complete).
"""

from __future__ import annotations

import click
from click.shell_completion import get_completion_class

SHELLS = ("bash", "zsh", "fish")


@click.command()
@click.argument("shell", type=click.Choice(SHELLS))
@click.pass_context
def completion(ctx: click.Context, shell: str) -> None:
    """Print the completion script for SHELL (the Nix package installs all three).

    \b
    Example:
      eval "$(nixfleet completion bash)"          # in ~/.bashrc
      nixfleet completion zsh > ~/.zfunc/_nixfleet  # then: fpath+=~/.zfunc; compinit
      nixfleet completion fish > ~/.config/fish/completions/nixfleet.fish
    """
    cls = get_completion_class(shell)
    assert cls is not None  # every name in SHELLS is one of Click's
    click.echo(cls(ctx.find_root().command, {}, "nixfleet", "_NIXFLEET_COMPLETE").source())
