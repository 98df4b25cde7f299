"""`nixfleet audit`: who changed what, as a table, JSON or spreadsheet-safe CSV."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

import click

from nixfleet.cli.context import State, pass_state
from nixfleet.cli.options import output_options
from nixfleet.cli.output import emit_json, message, table

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
CSV_FIELDS = ("id", "at", "actor", "action", "target", "detail")


def csv_cell(value: Any) -> str:
    """A cell a spreadsheet shows as text: a leading = + - @ TAB CR gets a single quote.

    Targets, tags and messages come from agents and operators; without this a cell
    like `=HYPERLINK(...)` would be evaluated when someone opens the export.
    """
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return "'" + text if text.startswith(FORMULA_START) else text


def to_csv(entries: Sequence[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for e in entries:
        writer.writerow([csv_cell(e[f]) for f in CSV_FIELDS])
    return buf.getvalue()


@click.command()
@click.option("--actor", help="Only this actor, e.g. key:ops or machine:web-01.")
@click.option("--action", help="Only this action, e.g. key.create or machine.lifecycle.")
@click.option("--target", help="Only this target (machine id, key name, rollout …).")
@click.option(
    "--limit",
    type=click.IntRange(1, 10_000),
    default=100,
    show_default=True,
    help="Newest entries to show.",
)
@output_options()
@click.option("--csv", "csv_", is_flag=True, help="CSV output, safe to open in a spreadsheet.")
@pass_state
def audit(
    state: State,
    actor: str | None,
    action: str | None,
    target: str | None,
    limit: int,
    csv_: bool,
) -> None:
    """Show the audit log, newest first: every mutation with its time and actor.

    \b
    Example:
      nixfleet audit --target web-01
      nixfleet audit --actor key:ci --action rollout.apply --json
      nixfleet audit --limit 10000 --csv > audit.csv
    """
    if state.json and csv_:
        raise click.UsageError("choose one of --json and --csv")
    data = state.client().audit(actor, action, target, limit)
    entries = data["entries"]
    if csv_:
        click.echo(to_csv(entries), nl=False)
        return
    if state.json:
        emit_json(data)
        return
    rows = [
        [e["at"], e["actor"], e["action"], e["target"], json.dumps(e["detail"], sort_keys=True)]
        for e in entries
    ]
    table(["AT", "ACTOR", "ACTION", "TARGET", "DETAIL"], rows)
    message(f"{len(rows)} entr{'y' if len(rows) == 1 else 'ies'}")
