"""Rollout resources: apply, plan, list, detail, pause/resume/cancel."""

from __future__ import annotations

import falcon

from nixfleet.api.auth import Perm
from nixfleet.api.body import read_json
from nixfleet.api.context import Context
from nixfleet.errors import FieldError, ValidationError
from nixfleet.models import RolloutStatus, utcnow
from nixfleet.store import rollouts

STATUSES = [s.value for s in RolloutStatus] + ["invalid"]


class RolloutCollection:
    permissions = {"GET": Perm.READONLY, "POST": Perm.DEPLOY}
    schemas = {"POST": "rollout"}

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """List rollouts (newest first) and invalid rollout files; `status` filters."""
        status = req.get_param("status")
        if status is not None and status not in STATUSES:
            raise ValidationError(
                f"unknown status {status!r}",
                errors=[FieldError("status", f"one of: {', '.join(STATUSES)}")],
            )
        with self.ctx.store.read() as conn:
            resp.media = {"rollouts": rollouts.list_rollouts(conn, status)}

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Apply a rollout document; idempotent by name and content (200 when unchanged)."""
        doc = read_json(req, self.ctx.limit)
        now = utcnow()
        with self.ctx.store.transaction() as conn:
            applied = rollouts.apply(
                conn, doc, req.context.actor.label, now, self.ctx.settings.rollout_poll_hint
            )
            out = rollouts.detail(conn, applied.id, now)
        resp.status = falcon.HTTP_201 if applied.created else falcon.HTTP_200
        resp.location = f"/api/v1/rollouts/{applied.id}"
        resp.media = {**out, "created": applied.created}


class RolloutPlan:
    permissions = {"POST": Perm.READONLY}
    schemas = {"POST": "rollout"}

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        """The batches `apply` would create, and the hosts it would skip; changes nothing."""
        spec = rollouts.spec_of(read_json(req, self.ctx.limit))
        with self.ctx.store.read() as conn:
            p, _ = rollouts.make_plan(conn, spec)
        resp.media = rollouts.plan_json(spec, p)


class RolloutItem:
    permissions = {"GET": Perm.READONLY}

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response, rollout_id: str) -> None:
        """One rollout (by id or name): batches, per-machine health and reasons, events."""
        with self.ctx.store.read() as conn:
            resp.media = rollouts.detail(conn, rollouts.resolve(conn, rollout_id), utcnow())


class _Control:
    permissions = {"POST": Perm.DEPLOY}
    action = ""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def _run(self, req: falcon.Request, resp: falcon.Response, rollout_id: str) -> None:
        now = utcnow()
        with self.ctx.store.transaction() as conn:
            rid = rollouts.control(
                conn,
                rollout_id,
                self.action,
                req.context.actor.label,
                now,
                self.ctx.settings.rollout_poll_hint,
            )
            resp.media = rollouts.detail(conn, rid, now)


class RolloutPause(_Control):
    action = "pause"

    def on_post(self, req: falcon.Request, resp: falcon.Response, rollout_id: str) -> None:
        """Pause a running rollout: no new batch starts; machines keep their desired state."""
        self._run(req, resp, rollout_id)


class RolloutResume(_Control):
    action = "resume"

    def on_post(self, req: falcon.Request, resp: falcon.Response, rollout_id: str) -> None:
        """Resume a paused rollout; failed batches run again."""
        self._run(req, resp, rollout_id)


class RolloutCancel(_Control):
    action = "cancel"

    def on_post(self, req: falcon.Request, resp: falcon.Response, rollout_id: str) -> None:
        """Cancel: no further batches; machines stay where they are."""
        self._run(req, resp, rollout_id)
