"""Credential resources: operator API keys and per-machine agent tokens (admin only).

Secrets appear in exactly one response each, the one that created them; listings,
the audit log and the process log only ever name keys and machines.
"""

from __future__ import annotations

import falcon

from nixfleet import wire
from nixfleet.api.auth import Perm
from nixfleet.api.body import read_document
from nixfleet.api.context import Context
from nixfleet.errors import ConflictError, GoneError
from nixfleet.models import Lifecycle, utcnow, validate_hostname
from nixfleet.store import audit, credentials, machines
from nixfleet.store.credentials import ApiKey


def key_json(k: ApiKey) -> wire.Key:
    return {
        "name": k.name,
        "role": k.role,
        "created_at": k.created_at,
        "created_by": k.created_by,
        "revoked_at": k.revoked_at,
        "active": k.revoked_at is None,
    }


class KeyCollection:
    permissions = {"GET": Perm.ADMIN, "POST": Perm.ADMIN}
    schemas = {"POST": "key-create"}

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """List API keys (names and roles, never the keys); `?all=true` adds revoked ones."""
        include_revoked = req.get_param_as_bool("all", default=False)
        with self.ctx.store.read() as conn:
            found = credentials.list_keys(conn, include_revoked=include_revoked)
        resp.media = {"keys": [key_json(k) for k in found]}

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Create an API key; the response is the only time its secret is shown."""
        doc = read_document(req, self.schemas["POST"], self.ctx.limit, "API key")
        now = utcnow()
        actor = req.context.actor.label
        with self.ctx.store.transaction() as conn:
            secret = credentials.create_key(conn, doc["name"], doc["role"], actor, now)
            audit.record(conn, actor, "key.create", doc["name"], now, {"role": doc["role"]})
            created = credentials.get_key(conn, doc["name"])
        resp.status = falcon.HTTP_201
        resp.location = f"/api/v1/keys/{doc['name']}"
        resp.media = {**key_json(created), "key": secret}


class KeyItem:
    permissions = {"GET": Perm.ADMIN, "DELETE": Perm.ADMIN}

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        """One API key's name, role and state."""
        credentials.validate_key_name(name)
        with self.ctx.store.read() as conn:
            resp.media = key_json(credentials.get_key(conn, name))

    def on_delete(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        """Revoke a key: it gets 401 from its next request on.

        The last active admin key cannot be revoked over the API (the fleet would
        have no admin left on the network); do that on the host if you mean it.
        """
        credentials.validate_key_name(name)
        now = utcnow()
        with self.ctx.store.transaction() as conn:
            key = credentials.get_key(conn, name)
            if key.role == "admin" and credentials.active_admins(conn) == [name]:
                raise ConflictError(
                    f"{name!r} is the last active admin key; create another admin key first, "
                    "or revoke it on the host: `nixfleet-control-plane keys revoke " + name + "`"
                )
            credentials.revoke_key(conn, name, now)
            audit.record(conn, req.context.actor.label, "key.revoke", name, now, {"role": key.role})
            resp.media = key_json(credentials.get_key(conn, name))


class MachineToken:
    permissions = {"POST": Perm.ADMIN, "DELETE": Perm.ADMIN}

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def on_post(self, req: falcon.Request, resp: falcon.Response, machine_id: str) -> None:
        """Issue or rotate the machine's agent token; the previous one is dead at once."""
        validate_hostname(machine_id)
        now = utcnow()
        with self.ctx.store.transaction() as conn:
            m = machines.get(conn, machine_id)
            if m.lifecycle is Lifecycle.DECOMMISSIONED:
                raise GoneError(f"machine {machine_id!r} is decommissioned; it gets no token")
            rotated = credentials.has_token(conn, machine_id)
            token = credentials.issue_token(conn, machine_id, now)
            audit.record(
                conn,
                req.context.actor.label,
                "machine.token-rotate" if rotated else "machine.token-issue",
                machine_id,
                now,
            )
        resp.status = falcon.HTTP_201
        resp.media = {"machine_id": machine_id, "token": token, "rotated": rotated}

    def on_delete(self, req: falcon.Request, resp: falcon.Response, machine_id: str) -> None:
        """Revoke the machine's agent token (e.g. a lost or reinstalled host may re-enroll)."""
        validate_hostname(machine_id)
        now = utcnow()
        with self.ctx.store.transaction() as conn:
            machines.get(conn, machine_id)
            had = credentials.revoke_token(conn, machine_id)
            audit.record(
                conn,
                req.context.actor.label,
                "machine.token-revoke",
                machine_id,
                now,
                {"had_token": had},
            )
        resp.media = {"machine_id": machine_id, "revoked": had}
