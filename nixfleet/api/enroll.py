"""Enrollment: operators mint limited, expiring tokens; new agents trade one for their own.

The exchange never takes over a machine that already has an agent token (that
would let anyone holding an enrollment token cut a running agent off and speak
for its host); an operator revokes the old token first, which is the explicit
"this host was reinstalled" step.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import falcon

from nixfleet import schemas, wire
from nixfleet.api.auth import Perm
from nixfleet.api.body import read_document, read_json
from nixfleet.api.context import Context
from nixfleet.errors import (
    AuthenticationError,
    ConflictError,
    FieldError,
    GoneError,
    NotFoundError,
    ValidationError,
)
from nixfleet.models import Lifecycle, isoformat, utcnow
from nixfleet.store import audit, credentials, enrollment, machines
from nixfleet.store.conn import Connection
from nixfleet.store.enrollment import EnrollToken

TOKEN_ID_MAX = 32


def token_json(t: EnrollToken, now: datetime) -> wire.EnrollToken:
    return {
        "id": t.id,
        "state": t.state(now),
        "uses_left": t.uses_left,
        "uses_total": t.uses_total,
        "expires_at": t.expires_at,
        "tags": list(t.tags),
        "hostname_glob": t.hostname_glob,
        "created_at": t.created_at,
        "created_by": t.created_by,
        "revoked_at": t.revoked_at,
        "last_used_at": t.last_used_at,
    }


def _check_id(token_id: str) -> str:
    if not (
        token_id.startswith("et-")
        and len(token_id) <= TOKEN_ID_MAX
        and all(c in "0123456789abcdef" for c in token_id[3:])
    ):
        raise NotFoundError(f"no enrollment token {token_id[:40]!r}; ids look like et-1a2b3c4d5e6f")
    return token_id


class EnrollTokenCollection:
    permissions = {"GET": Perm.ADMIN, "POST": Perm.ADMIN}
    schemas = {"POST": "enroll-token-create"}

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """List enrollment tokens with their state (never the secrets)."""
        now = utcnow()
        with self.ctx.store.read() as conn:
            found = enrollment.list_tokens(conn)
        resp.media = {"enroll_tokens": [token_json(t, now) for t in found]}

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Create an enrollment token; the response is the only time its secret is shown."""
        doc = read_document(req, self.schemas["POST"], self.ctx.limit, "enrollment token")
        now = utcnow()
        actor = req.context.actor.label
        with self.ctx.store.transaction() as conn:
            token, secret = enrollment.create(
                conn,
                uses=doc.get("uses", 1),
                lifetime=timedelta(seconds=doc.get("expires_in_seconds", 86400)),
                tags=doc.get("tags", []),
                hostname_glob=doc.get("hostname_glob"),
                created_by=actor,
                now=now,
            )
            audit.record(
                conn,
                actor,
                "enroll-token.create",
                token.id,
                now,
                {
                    "uses": token.uses_total,
                    "expires_at": token.expires_at,
                    "tags": list(token.tags),
                    "hostname_glob": token.hostname_glob,
                },
            )
        resp.status = falcon.HTTP_201
        resp.location = f"/api/v1/enroll-tokens/{token.id}"
        resp.media = {**token_json(token, now), "token": secret}


class EnrollTokenItem:
    permissions = {"GET": Perm.ADMIN, "DELETE": Perm.ADMIN}

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response, token_id: str) -> None:
        """One enrollment token's state."""
        _check_id(token_id)
        with self.ctx.store.read() as conn:
            resp.media = token_json(enrollment.get(conn, token_id), utcnow())

    def on_delete(self, req: falcon.Request, resp: falcon.Response, token_id: str) -> None:
        """Revoke an enrollment token; machines that already enrolled keep their tokens."""
        _check_id(token_id)
        now = utcnow()
        with self.ctx.store.transaction() as conn:
            token = enrollment.revoke(conn, token_id, now)
            audit.record(conn, req.context.actor.label, "enroll-token.revoke", token_id, now)
        resp.media = token_json(token, now)


class Enroll:
    """The agent's side: enrollment token in, machine token out."""

    permissions = {"POST": Perm.ENROLL}
    schemas = {"POST": "enroll"}

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Exchange an enrollment token for this machine's agent token (shown once).

        Registers the machine (pending, with the token's preset tags) when it is
        new; uses the token up by one in the same transaction.
        """
        doc = read_json(req, self.ctx.limit)
        body_token = doc.get("enroll_token") if isinstance(doc, dict) else None
        if body_token is None and req.context.enroll_token is None:
            raise AuthenticationError(
                "enrollment needs a token: `enroll_token` in the body or "
                "`Authorization: Bearer nfe_…`"
            )
        schemas.validate(self.schemas["POST"], doc, "enrollment")
        secret = str(body_token or req.context.enroll_token)
        if "machine_id" in doc and "id" in doc:
            raise ValidationError(
                "send the machine id once",
                errors=[FieldError("id", "alias of machine_id; send only machine_id")],
            )
        machine_id = str(doc.get("machine_id") or doc.get("id") or "")
        if not machine_id:
            raise ValidationError(
                "invalid enrollment: 1 error(s)", errors=[FieldError("machine_id", "is required")]
            )
        now = utcnow()
        with self.ctx.store.transaction() as conn:
            token = enrollment.redeem(conn, secret, machine_id, now)
            actor = f"enroll:{token.id}"
            new = self._prepare_machine(conn, machine_id, token, doc.get("tags"), now)
            issued = credentials.issue_token(conn, machine_id, now)
            audit.record(
                conn,
                actor,
                "machine.enroll",
                machine_id,
                now,
                {"new": new, "enroll_token": token.id, "tags": list(token.tags)},
            )
        resp.status = falcon.HTTP_201
        resp.media = {"machine_id": machine_id, "token": issued, "enrolled_at": isoformat(now)}

    @staticmethod
    def _prepare_machine(
        conn: Connection,
        machine_id: str,
        token: EnrollToken,
        agent_tags: list[str] | None,
        now: datetime,
    ) -> bool:
        """Register the machine if new; refuse one that is gone or has a live agent token."""
        lifecycle = machines.find_lifecycle(conn, machine_id)
        if lifecycle is None:
            machines.register(conn, machine_id, token.tags, Lifecycle.PENDING, now)
        elif lifecycle is Lifecycle.DECOMMISSIONED:
            raise GoneError(f"machine {machine_id!r} is decommissioned; it cannot enroll")
        elif credentials.has_token(conn, machine_id):
            raise ConflictError(
                f"machine {machine_id!r} already has an agent token; if the host was reinstalled, "
                f"revoke the old one first: `nixfleet machines revoke-token {machine_id}`"
            )
        else:
            machines.set_tags(conn, machine_id, token.tags, "operator", replace=False)
        if agent_tags:
            machines.set_tags(conn, machine_id, agent_tags, "agent", replace=True)
        return lifecycle is None
