"""GET /api/v1/machines/{id}/history: the machine's timeline of changes, paginated."""

from __future__ import annotations

from datetime import datetime

import falcon

from nixfleet import wire
from nixfleet.api import params
from nixfleet.api.auth import Perm
from nixfleet.api.context import Context
from nixfleet.api.params import IntParam
from nixfleet.errors import FieldError, ValidationError
from nixfleet.history import Event, EventKind
from nixfleet.models import isoformat, parse_time, validate_hostname
from nixfleet.store import history, machines


def event_json(e: Event) -> wire.HistoryEvent:
    return {
        "id": e.id,
        "at": isoformat(e.at) or "",
        "kind": e.kind.value,
        "source": e.source,
        "generation": e.generation,
        "previous": e.previous,
        "detail": dict(e.detail),
    }


def _time(req: falcon.Request, name: str) -> datetime | None:
    value = req.get_param(name)
    if value is None:
        return None
    try:
        ts = parse_time(value)
    except ValueError:
        ts = None
    if ts is None or ts.tzinfo is None:
        raise ValidationError(
            f"invalid {name} {value!r}",
            errors=[FieldError(name, "an RFC 3339 time with a zone, e.g. 2026-11-27T09:00:00Z")],
        )
    return ts


AFTER = IntParam("after", 0, 2**62, 0, "the `next_after` of the previous page")
LIMIT = params.limit(history.MAX_PAGE, what="events per page")


def kind_params(req: falcon.Request) -> list[EventKind]:
    """`?kind=a&kind=b` and `?kind=a,b`; an unknown kind is a 422 naming the known ones."""
    raw = [k for v in req.get_param_as_list("kind") or [] for k in v.split(",") if k]
    known = {k.value: k for k in EventKind}
    bad = [k for k in raw if k not in known]
    if bad:
        raise ValidationError(
            f"unknown event kind {bad[0]!r}",
            errors=[FieldError("kind", f"one of: {', '.join(known)}")],
        )
    return [known[k] for k in raw]


class MachineHistory:
    permissions = {"GET": Perm.AGENT_OR_READONLY}
    query = {
        "GET": [
            ("since", "string", "only events at or after this RFC 3339 time"),
            ("until", "string", "only events before this RFC 3339 time"),
            ("kind", "string", f"event kinds, comma-separated: {', '.join(EventKind)}"),
            AFTER,
            LIMIT,
        ]
    }

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response, machine_id: str) -> None:
        """The machine's history of changes, oldest first; `next_after` pages on."""
        validate_hostname(machine_id)
        since, until = _time(req, "since"), _time(req, "until")
        kinds = kind_params(req)
        after, limit = AFTER.read(req), LIMIT.read(req)
        with self.ctx.store.read() as conn:
            machines.get(conn, machine_id)  # 404 for an unknown machine
            found = history.page(
                conn, machine_id, since=since, until=until, kinds=kinds, after=after, limit=limit
            )
        resp.media = {
            "machine_id": machine_id,
            "events": [event_json(e) for e in found.events],
            "next_after": found.next_after,
        }
