"""Options several commands share, declared once: output format, tag lists, secret files.

`output_options` is the one `--json` (and `--wide`) of every command; it sets the
invocation's State, so a command reads `state.json` whether the flag came before
or after the command name. `TAG_LIST` is the one parser of comma-separated lists.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import click

from nixfleet import filters
from nixfleet.cli import complete
from nixfleet.cli.context import State
from nixfleet.errors import UsageError, ValidationError
from nixfleet.models import Health, Lifecycle, Sync

F = TypeVar("F", bound=Callable[..., Any])


def split_list(value: str | None) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c']: commas separate, spaces around items do not count."""
    return [item.strip() for item in (value or "").split(",") if item.strip()]


class CommaList(click.ParamType):  # type: ignore[type-arg]
    """A comma-separated list option (`--tags prod,web`), completed from the fleet."""

    name = "list"

    def __init__(self, completer: complete.Completer | None = None) -> None:
        self.completer = completer

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, list):
            return value
        return split_list(str(value))

    def shell_complete(
        self, ctx: click.Context, param: click.Parameter, incomplete: str
    ) -> list[click.shell_completion.CompletionItem]:
        if self.completer is None:
            return []
        done, _, last = incomplete.rpartition(",")
        prefix = done + "," if done else ""
        chosen = set(split_list(done))
        return [
            click.shell_completion.CompletionItem(prefix + value)
            for value in self.completer(ctx)
            if value.startswith(last) and value not in chosen
        ]


TAG_LIST = CommaList(complete.tags)
HOST_LIST = CommaList(complete.machines)


def _set_state(attr: str) -> Callable[[click.Context, click.Parameter, bool], None]:
    def callback(ctx: click.Context, param: click.Parameter, value: bool) -> None:
        if value:
            setattr(ctx.ensure_object(State), attr, True)

    return callback


def output_options(wide: bool = False) -> Callable[[F], F]:
    """`--json` (and, for tables with store paths, `--wide`) on a command."""

    def decorate(f: F) -> F:
        f = click.option(
            "--json",
            is_flag=True,
            expose_value=False,
            callback=_set_state("json"),
            help="Machine-readable JSON on stdout (full store paths, RFC 3339 times).",
        )(f)
        if wide:
            f = click.option(
                "--wide",
                is_flag=True,
                expose_value=False,
                callback=_set_state("wide"),
                help="Show full store paths.",
            )(f)
        return f

    return decorate


def secret_output(what: str) -> Callable[[F], F]:
    """`--output FILE`: write a new secret to FILE, created 0600, never over another file."""
    return click.option(
        "-o",
        "--output",
        type=click.Path(dir_okay=False, path_type=Path),
        help=f"Write the {what} to this new file (mode 0600) instead of stdout.",
    )


def filter_options(f: F) -> F:
    """The fleet filters of `status` and `machines list` (nixfleet.filters, parsed once).

    The command receives `machine_filter` (a MachineFilter) instead of the raw
    options; a bad value is a usage error (exit 2) naming it and the allowed ones.
    """

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            kwargs["machine_filter"] = filters.parse(
                tags=kwargs.pop("tags"),
                lifecycle=kwargs.pop("lifecycle"),
                sync=kwargs.pop("sync"),
                health=kwargs.pop("health"),
                stale="true" if kwargs.pop("stale") else None,
                host=kwargs.pop("host"),
                sort=kwargs.pop("sort"),
                descending=kwargs.pop("reverse"),
                names={"tags": "--tags", "lifecycle": "--lifecycle", "sync": "--sync",
                       "health": "--health", "host": "HOST", "sort": "--sort"},
            )  # fmt: skip
        except ValidationError as e:
            raise UsageError(e.detail) from None
        return f(*args, **kwargs)

    decorators = [
        click.argument("host", required=False, shell_complete=complete.machine_items),
        click.option(
            "--tags",
            default="",
            metavar="TAG,…",
            shell_complete=TAG_LIST.shell_complete,
            help="Only machines carrying all these tags (comma-separated); !TAG excludes.",
        ),
        click.option("--lifecycle", metavar="STATE", help=f"Only: {', '.join(Lifecycle)}."),
        click.option(
            "--sync",
            metavar="STATE",
            help=f"Only: {', '.join(filters.sync_word(s) for s in Sync)}.",
        ),
        click.option("--health", metavar="STATE", help=f"Only: {', '.join(Health)}."),
        click.option("--stale", is_flag=True, help="Only machines whose agent went quiet."),
        click.option(
            "--sort",
            metavar="KEY",
            help=f"Order by: {', '.join(filters.SORT_KEYS)} (default host).",
        ),
        click.option("--reverse", is_flag=True, help="Reverse the --sort order."),
    ]
    out: Any = wrapper
    for d in reversed(decorators):
        out = d(out)
    return cast(F, out)


def tags_option(help_text: str) -> Callable[[F], F]:
    return click.option("--tags", type=TAG_LIST, default="", metavar="TAG,…", help=help_text)


machine_argument = click.argument("machine_id", shell_complete=complete.machine_items)
rollout_argument = click.argument("rollout_id", shell_complete=complete.rollout_items)
