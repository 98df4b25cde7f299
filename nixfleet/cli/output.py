"""Rendering: tables, JSON, times and generations. Results go to stdout, messages to stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TypedDict

import click
import orjson

from nixfleet.cli.config import no_color_requested
from nixfleet.models import parse_time, utcnow


class Style(TypedDict, total=False):
    """The keyword arguments of click.style that table cells use."""

    fg: str
    bold: bool
    dim: bool


ColumnStyles = dict[int, Callable[[str], Style]]  # column index -> style of a cell

COLOR_MODES = ("auto", "always", "never")
_color = {"mode": "auto"}


def set_color(mode: str | None) -> None:
    """--color auto|always|never; `auto` means a terminal and no NO_COLOR (no-color.org)."""
    _color["mode"] = mode or "auto"


def use_color() -> bool:
    mode = _color["mode"]
    if mode != "auto":
        return mode == "always"
    return not no_color_requested() and sys.stdout.isatty()


def emit_json(data: Any) -> None:
    """Indented JSON on stdout.

    json.dumps(indent=2) runs the pure-Python encoder (~1.2 s for `status --json` at
    100,000 machines); orjson writes the same bytes in C (~70 ms). Its output is only
    used when it is ASCII, i.e. when json.dumps (ensure_ascii) would write the same.
    """
    try:
        out = orjson.dumps(data, option=orjson.OPT_INDENT_2)
    except (orjson.JSONEncodeError, TypeError):
        out = b""
    if out and out.isascii():
        click.echo(out)  # bytes go to stdout's buffer as they are: no 40 MB decode/encode
    else:
        click.echo(json.dumps(data, indent=2, sort_keys=False))


def style(text: str, **kwargs: Any) -> str:
    return click.style(text, **kwargs) if use_color() else text


def echo(text: str = "") -> None:
    """A result line on stdout; colour codes pass when --color always asks for them."""
    click.echo(text, color=use_color() or None)


def message(text: str) -> None:
    """A human note: stderr, so stdout stays parseable."""
    click.echo(text, err=True)


def printable(text: str) -> str:
    """Escape control characters: agents and files must not drive the operator's terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def short_generation(path: str | None, wide: bool = False) -> str:
    """/nix/store/<32 hash>-<name> -> <7 hash>-<name> (the whole path with --wide)."""
    if not path:
        return "-"
    if wide:
        return path
    base = path.rsplit("/", 1)[-1]
    digest, _, name = base.partition("-")
    return f"{digest[:7]}-{name}" if name else base[:7]


def duration(seconds: int) -> str:
    """3d 4h, 5h 12m, 7m 3s, 42s: the two largest units."""
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size or (unit == "s" and not parts):
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return " ".join(parts[:2])


def ago(value: str | None, now: datetime | None = None) -> str:
    when = parse_time(value)
    if when is None:
        return "never"
    seconds = int(((now or utcnow()) - when).total_seconds())
    seconds = max(seconds, 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    colors: ColumnStyles | None = None,
    show_headers: bool = True,
) -> None:
    """Left-aligned columns; colours (per column, a function of the cell) when use_color()."""
    widths = [len(h) for h in headers]
    rows = [[printable(cell) for cell in row] for row in rows]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    if show_headers:
        echo("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in rows:
        cells = []
        for i, (cell, width) in enumerate(zip(row, widths, strict=True)):
            padded = cell.ljust(width)
            if colors and i in colors:
                padded = style(padded, **colors[i](cell))
            cells.append(padded)
        echo("  ".join(cells).rstrip())
