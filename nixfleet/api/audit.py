"""The audit log over HTTP: who changed what, newest first (readonly)."""

from __future__ import annotations

import falcon

from nixfleet.api import params
from nixfleet.api.auth import Perm
from nixfleet.api.context import Context
from nixfleet.errors import FieldError, ValidationError
from nixfleet.store import audit

MAX_LIMIT = 10_000
LIMIT = params.limit(MAX_LIMIT)
FILTER_MAX = 256


def _filter(req: falcon.Request, name: str) -> str | None:
    value = req.get_param(name)
    if value is not None and (len(value) > FILTER_MAX or "\x00" in value):
        raise ValidationError(
            f"invalid {name} filter",
            errors=[FieldError(name, f"at most {FILTER_MAX} characters, no NUL")],
        )
    return value


class AuditLog:
    permissions = {"GET": Perm.READONLY}
    query = {
        "GET": [
            ("actor", "string", "only entries of this actor (exact, e.g. `key:ops`)"),
            ("action", "string", "only entries of this action (exact, e.g. `machine.register`)"),
            ("target", "string", "only entries about this target (exact, e.g. `web-01`)"),
            LIMIT,
        ]
    }

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Audit entries, newest first; exact-match `actor`, `action`, `target`; `limit`.

        Actors look like `key:<name>`, `machine:<id>`, `enroll:<token id>`, `host:<how>`
        or the reconciler's label, exactly as they appear in the entries.
        """
        limit = LIMIT.read(req)
        actor = _filter(req, "actor")
        with self.ctx.store.read() as conn:
            entries = audit.query(
                conn, actor, _filter(req, "action"), _filter(req, "target"), limit
            )
        resp.media = {
            "entries": [
                {
                    "id": e.id,
                    "at": e.at,
                    "actor": e.actor,
                    "action": e.action,
                    "target": e.target,
                    "detail": e.detail,
                }
                for e in entries
            ]
        }
