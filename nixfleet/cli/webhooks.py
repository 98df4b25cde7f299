"""`nixfleet webhooks deliveries`: what the control plane sent to which receiver, and how."""

from __future__ import annotations

import click

from nixfleet.cli.context import State, pass_state
from nixfleet.cli.options import output_options
from nixfleet.cli.output import ago, emit_json, message, table


@click.group()
def webhooks() -> None:
    """Webhook deliveries (settings `webhooks`; docs/webhooks.md).

    \b
    Example:
      nixfleet webhooks deliveries --failed
    """


@webhooks.command("deliveries")
@click.option("--failed", is_flag=True, help="Only deliveries failing or given up.")
@click.option(
    "--limit",
    type=click.IntRange(1, 1000),
    default=100,
    show_default=True,
    help="Newest deliveries to show.",
)
@output_options()
@pass_state
def deliveries(state: State, failed: bool, limit: int) -> None:
    """List webhook deliveries, newest first, with their state and last attempt (admin).

    A delivery is `pending` (not yet sent, or retrying with back-off), `delivered`
    (a 2xx answer) or `failed` (given up after the retry period, 24 h by default).

    \b
    Example:
      nixfleet webhooks deliveries
      nixfleet webhooks deliveries --failed --json
    """
    data = state.client().webhook_deliveries(failed=failed, limit=limit)
    if state.json:
        emit_json(data)
        return
    rows = []
    for d in data["deliveries"]:
        event = d["event"]
        rollout = event["rollout"]
        subject = event["machine"] or (rollout["name"] if rollout else None) or "-"
        if d["state"] == "delivered":
            last = f"HTTP {d['last_status']}"
        elif d["last_error"]:
            last = d["last_error"]
        else:
            last = "-"
        when = "" if d["next_attempt_at"] is None else f"next {d['next_attempt_at']}"
        rows.append(
            [
                str(d["id"]),
                event["event"],
                subject,
                d["url"],
                d["state"],
                str(d["attempts"]),
                ago(d["last_attempt_at"]) if d["last_attempt_at"] else "never",
                last if not when else f"{last} ({when})",
            ]
        )
    table(["ID", "EVENT", "SUBJECT", "URL", "STATE", "TRIES", "LAST TRY", "RESULT"], rows)
    message(f"{len(rows)} deliver{'y' if len(rows) == 1 else 'ies'}")
