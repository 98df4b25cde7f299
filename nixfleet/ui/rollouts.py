"""Rollouts: the list, one rollout's batches, machines and events, and its controls.

Reads and controls go through the API's responders (ui.bridge): the page shows the
documented rollout JSON (docs/api.md), and pause/resume/cancel are the API's.
"""

from __future__ import annotations

import falcon

from nixfleet import wire
from nixfleet.api import rollouts as rollouts_api
from nixfleet.errors import FieldError, ValidationError
from nixfleet.ui import bridge
from nixfleet.ui.web import PREFIX, Page, Viewer

REFRESH_SECONDS = 3
CONTROLS = {
    "pause": rollouts_api.RolloutPause,
    "resume": rollouts_api.RolloutResume,
    "cancel": rollouts_api.RolloutCancel,
}
# Which controls make sense in which state (the API refuses the others with 409).
OFFERED = {"running": ("pause", "cancel"), "paused": ("resume", "cancel")}
STATUSES = rollouts_api.STATUSES


def progress(batch: wire.Batch) -> dict[str, int]:
    """A batch's machines by health, for its progress bar."""
    counts = {"healthy": 0, "unhealthy": 0, "pending": 0, **batch["counts"]}
    return {**counts, "total": sum(batch["counts"].values())}


class RolloutList(Page):
    def get(self, req: falcon.Request, resp: falcon.Response, viewer: Viewer) -> None:
        status = req.get_param("status") or ""
        if status and status not in STATUSES:
            raise ValidationError(
                f"unknown status {status[:64]!r}",
                errors=[FieldError("status", f"one of: {', '.join(STATUSES)}")],
            )
        resource = rollouts_api.RolloutCollection(self.ui.ctx)
        query = {"status": status} if status else {}
        data = bridge.call(resource, "GET", viewer.actor, query=query)
        self.ui.render(
            resp,
            "rollouts.html",
            viewer=viewer,
            rollouts=data["rollouts"],
            status=status,
            statuses=STATUSES,
            nav="rollouts",
        )


class RolloutPage(Page):
    """GET /ui/rollouts/{id}; with ?part=live only the part htmx refreshes."""

    def get(
        self, req: falcon.Request, resp: falcon.Response, viewer: Viewer, rollout_id: str
    ) -> None:
        resource = rollouts_api.RolloutItem(self.ui.ctx)
        r = bridge.call(resource, "GET", viewer.actor, rollout_id=rollout_id)
        live = req.get_param("part") == "live"
        self.ui.render(
            resp,
            "_rollout_live.html" if live else "rollout.html",
            viewer=viewer,
            r=r,
            progress=progress,
            offered=OFFERED.get(r["status"], ()),
            refresh=REFRESH_SECONDS,
            nav="rollouts",
        )


class RolloutControl(Page):
    """POST /ui/rollouts/{id}/{action} — the API's pause/resume/cancel, for deploy keys."""

    roles = {"POST": "deploy"}

    def post(
        self,
        req: falcon.Request,
        resp: falcon.Response,
        viewer: Viewer,
        rollout_id: str,
        action: str,
    ) -> None:
        control = CONTROLS.get(action)
        if control is None:
            raise falcon.HTTPNotFound(description=f"no rollout action {action!r}")
        r = bridge.call(control(self.ui.ctx), "POST", viewer.actor, rollout_id=rollout_id)
        if req.get_header("HX-Request") == "true":
            self.ui.render(
                resp,
                "_rollout_live.html",
                viewer=viewer,
                r=r,
                progress=progress,
                offered=OFFERED.get(r["status"], ()),
                refresh=REFRESH_SECONDS,
                nav="rollouts",
            )
            return
        resp.status = falcon.HTTP_303
        resp.location = f"{PREFIX}/rollouts/{r['id']}"
