"""The machine page: generations, tags by source, health checks, history, lifecycle."""

from __future__ import annotations

import falcon

from nixfleet.api import machines as machines_api
from nixfleet.errors import FieldError, ValidationError
from nixfleet.models import TRANSITIONS, Lifecycle, health_of, utcnow, validate_hostname
from nixfleet.store import history, machines
from nixfleet.ui import bridge
from nixfleet.ui.web import PREFIX, Page, Viewer

RECENT = 50  # history events a timeline page shows ("older" pages back, server-side)


def _flash(changed: str | None) -> str:
    """The note after a change: only ever a fixed text, never the query string's."""
    values = {life.value for life in Lifecycle}
    return f"Lifecycle changed to {changed}." if changed in values else ""


class MachinePage(Page):
    roles = {"GET": "readonly"}

    def get(
        self, req: falcon.Request, resp: falcon.Response, viewer: Viewer, machine_id: str
    ) -> None:
        validate_hostname(machine_id)
        try:
            before = req.get_param_as_int("before", min_value=1)
        except falcon.HTTPInvalidParam:
            raise ValidationError(
                "invalid before", errors=[FieldError("before", "an event id (a whole number)")]
            ) from None
        now = utcnow()
        with self.ui.ctx.store.read() as conn:
            m = machines.get(conn, machine_id)
            events = history.latest(conn, machine_id, RECENT + 1, before)
        # One more than a page read: whether there is an older page, and where it starts.
        older = events[1].id if len(events) > RECENT else None
        events = events[-RECENT:]
        part = req.get_param("part") == "timeline"  # htmx: the next (older) items only
        self.ui.render(
            resp,
            "_timeline.html" if part else "machine.html",
            older=older,
            viewer=viewer,
            m=m,
            now=now,
            health=health_of(m.health),
            stale=m.stale(now, self.ui.ctx.settings.stale_after),
            targets=sorted(TRANSITIONS[m.lifecycle]),
            timeline=list(reversed(events)),
            flash=_flash(req.get_param("changed")),
            nav="fleet",
        )


class MachineLifecycle(Page):
    """POST /ui/machines/{id}/lifecycle — the API's PATCH, for admins."""

    roles = {"POST": "admin"}

    def post(
        self, req: falcon.Request, resp: falcon.Response, viewer: Viewer, machine_id: str
    ) -> None:
        validate_hostname(machine_id)
        target = self.form(req).get("lifecycle", "")
        try:
            Lifecycle(target)
        except ValueError:
            raise ValidationError(
                f"unknown lifecycle {target[:64]!r}",
                errors=[FieldError("lifecycle", f"one of: {', '.join(Lifecycle)}")],
            ) from None
        resource = machines_api.MachineLifecycle(self.ui.ctx)
        bridge.call(resource, "PATCH", viewer.actor, {"lifecycle": target}, machine_id=machine_id)
        resp.status = falcon.HTTP_303
        resp.location = f"{PREFIX}/machines/{machine_id}?changed={target}"
