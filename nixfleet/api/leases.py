"""POST/DELETE /api/v1/machines/{id}/reboot-lease: a machine's reboot slot (DESIGN §11).

FleetLock's two calls, for the machine's own agent: take (recursive: a holder gets
its lease back unchanged) and release (idempotent). "Not now" is 409 with the reason:
the rollout does not reboot, the window is closed (and when it opens), or the
group is full (and who holds it).
"""

from __future__ import annotations

import falcon

from nixfleet.api.auth import Perm
from nixfleet.api.context import Context
from nixfleet.models import utcnow, validate_hostname
from nixfleet.store import leases


class RebootLease:
    permissions = {"POST": Perm.AGENT, "DELETE": Perm.AGENT}

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def on_post(self, req: falcon.Request, resp: falcon.Response, machine_id: str) -> None:
        """Take a reboot slot in each of the machine's reboot groups (all or nothing)."""
        validate_hostname(machine_id)
        now = utcnow()
        settings = self.ctx.settings
        with self.ctx.store.transaction() as conn:
            resp.media = leases.take(
                conn,
                machine_id,
                settings.fleet_policy,
                now,
                req.context.actor.label,
                settings.policy_now(now),
            )

    def on_delete(self, req: falcon.Request, resp: falcon.Response, machine_id: str) -> None:
        """Give the machine's reboot slots back (none held is fine)."""
        validate_hostname(machine_id)
        with self.ctx.store.transaction() as conn:
            released = leases.release(conn, machine_id, utcnow(), req.context.actor.label)
        resp.media = {"released": released}
