"""Readiness: `/ready` says whether this process can take writes (DESIGN §4, §9).

`/health` is liveness (the process answers); `/ready` is what a load balancer or a
deploy waits for: the database file is still the one opened, migrated, and a real
write succeeds within the write-lock wait. 503 with the reason otherwise (disk full,
read-only, file replaced or deleted, write lock held elsewhere).
"""

from __future__ import annotations

import falcon

from nixfleet import __version__
from nixfleet.api.auth import Perm
from nixfleet.api.context import Context
from nixfleet.api.errors import problem
from nixfleet.errors import StoreUnavailableError


class Ready:
    permissions = {"GET": Perm.PUBLIC}

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Readiness: the database is writable and migrated (503 with the reason otherwise)."""
        reason = self.ctx.store.readiness()
        if reason is None:
            resp.media = {"status": "ready", "version": __version__}
            return
        problem(resp, 503, StoreUnavailableError.title, reason, StoreUnavailableError.slug)
        resp.set_header("Retry-After", str(StoreUnavailableError.retry_after))
