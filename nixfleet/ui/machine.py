"""The machine page: generations, tags by source, health checks, history, lifecycle."""

from __future__ import annotations

import falcon

from nixfleet.api import machines as machines_api
from nixfleet.errors import FieldError, ValidationError
from nixfleet.models import TRANSITIONS, Lifecycle, health_of, utcnow, validate_hostname
from nixfleet.store import history, machines
from nixfleet.ui import bridge
from nixfleet.ui.web import PREFIX, Page, Viewer

RECENT = 50  # history events on the page (the CLI: `nixfleet machines history HOST`)


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
        now = utcnow()
        with self.ui.ctx.store.read() as conn:
            m = machines.get(conn, machine_id)
            events = history.latest(conn, machine_id, RECENT)
        self.ui.render(
            resp,
            "machine.html",
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
