"""Webhook delivery state over HTTP (admin): what was sent where, and how it went."""

from __future__ import annotations

import falcon

from nixfleet import wire
from nixfleet.api import params
from nixfleet.api.auth import Perm
from nixfleet.api.context import Context
from nixfleet.errors import FieldError, ValidationError
from nixfleet.settings import display_url
from nixfleet.store import webhooks

MAX_LIMIT = 1000
LIMIT = params.limit(MAX_LIMIT, what="deliveries")


def delivery_json(d: webhooks.Delivery) -> wire.WebhookDelivery:
    """One delivery as the API and `nixfleet webhooks deliveries --json` show it."""
    return {
        "id": d.id,
        "url": display_url(d.url),
        "state": d.state,
        "attempts": d.attempts,
        "created_at": d.created_at,
        "expires_at": d.expires_at,
        "next_attempt_at": d.next_attempt_at,
        "last_attempt_at": d.last_attempt_at,
        "last_status": d.last_status,
        "last_error": d.last_error,
        "finished_at": d.finished_at,
        "event": d.event.payload(),
        "history": [
            {"at": a.at, "status": a.status, "error": a.error, "duration_ms": a.duration_ms}
            for a in d.history
        ],
    }


class WebhookDeliveries:
    permissions = {"GET": Perm.ADMIN}
    query = {"GET": [("failed", "boolean", "only failing or given-up deliveries"), LIMIT]}

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Webhook deliveries, newest first; `failed=true` for failing or given up; `limit`.

        Each delivery carries its event (the signed payload), its state (`pending`,
        `delivered`, `failed` = given up) and its latest attempts. URLs are shown
        without user info or query string.
        """
        limit = LIMIT.read(req)
        try:
            failed = req.get_param_as_bool("failed", default=False)
        except falcon.HTTPInvalidParam:
            raise ValidationError(
                "invalid failed filter", errors=[FieldError("failed", "true or false")]
            ) from None
        with self.ctx.store.read() as conn:
            found = webhooks.deliveries(conn, failed=bool(failed), limit=limit)
        resp.media = {"deliveries": [delivery_json(d) for d in found]}
