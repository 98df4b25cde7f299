"""The web dashboard (DESIGN §12): server-rendered pages under /ui, htmx for live parts.

mount() is the one line the API's app factory calls; with `ui = false` in the
settings it is not called and no /ui route exists.
"""

from __future__ import annotations

import falcon

from nixfleet.api.context import Context
from nixfleet.ui import audit, fleet, login, machine, rollouts
from nixfleet.ui.web import PREFIX, UI, Static

PAGES = [
    ("", fleet.Fleet),
    ("/fleet/live", fleet.FleetLive),
    ("/login", login.Login),
    ("/logout", login.Logout),
    ("/machines/{machine_id}", machine.MachinePage),
    ("/machines/{machine_id}/lifecycle", machine.MachineLifecycle),
    ("/rollouts", rollouts.RolloutList),
    ("/rollouts/{rollout_id}", rollouts.RolloutPage),
    ("/rollouts/{rollout_id}/{action}", rollouts.RolloutControl),
    ("/audit", audit.AuditPage),
]


def mount(app: falcon.App[falcon.Request, falcon.Response], ctx: Context) -> None:
    ui = UI(ctx)
    for path, page in PAGES:
        app.add_route(PREFIX + path, page(ui))
    app.add_route(PREFIX + "/static/{name}", Static(ui))
