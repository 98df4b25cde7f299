"""Who is asking, and may they? Every request gets an Actor before its responder runs.

Each route declares, per method, the least permission it needs (see app.ROUTES);
the middleware enforces it, so a responder never checks credentials itself and a
route cannot be added without saying who may call it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import falcon

from nixfleet.api.report_cache import ReportCache
from nixfleet.errors import AuthenticationError, GoneError, PermissionDeniedError
from nixfleet.models import Lifecycle
from nixfleet.store import credentials as creds
from nixfleet.store.conn import AnyStore
from nixfleet.store.enrollment import ENROLL_PREFIX

log = logging.getLogger(__name__)

ROLE_RANK = {"readonly": 1, "deploy": 2, "admin": 3}


class Perm(StrEnum):
    PUBLIC = "public"
    READONLY = "readonly"
    DEPLOY = "deploy"
    ADMIN = "admin"
    AGENT = "agent"  # the token of the machine named in the path
    AGENT_OR_READONLY = "agent-or-readonly"
    ENROLL = "enroll"  # an enrollment token, checked by the responder as it is used up


@dataclass(frozen=True)
class Actor:
    kind: str  # "key", "machine", "anonymous", "reconciler", "host"
    name: str
    role: str | None = None

    @property
    def label(self) -> str:
        """How the audit log names this actor."""
        return f"{self.kind}:{self.name}"


ANONYMOUS = Actor("anonymous", "-")


def _bearer(req: falcon.Request) -> str | None:
    header = req.get_header("Authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("use the header `Authorization: Bearer <key or token>`")
    return token.strip()


def _machine_actor(machine: str, lifecycle: str) -> Actor:
    if lifecycle == Lifecycle.DECOMMISSIONED:
        # Its token is kept so that its agent learns why (410), not just "no".
        raise GoneError(
            f"machine {machine!r} is decommissioned: the control plane refuses "
            "its agent (which now tries once an hour). Stop the agent, or "
            "register the host again under a new id"
        )
    return Actor("machine", machine)


def _resolve(
    store: AnyStore, token: str | None, cache: ReportCache | None = None, context: Any = None
) -> Actor:
    """The token's actor; with `cache` and `context`, a machine answered from the
    view leaves its entry in `context.cached_machine` (the report path judges the
    report against that same entry, current as of this look-up)."""
    if token is None:
        return ANONYMOUS
    if cache is not None and token.startswith(creds.TOKEN_PREFIX):
        cached = cache.token_machine(token)  # None: unknown, or the view may be behind
        if cached is not None:
            actor = _machine_actor(cached.id, cached.known.lifecycle)
            if context is not None:
                context.cached_machine = cached
            return actor
    with store.lookup() as conn:  # the warm writer connection when free (see Store)
        if token.startswith(creds.TOKEN_PREFIX):
            found_machine = creds.token_machine_lifecycle(conn, token)
            if found_machine is not None:
                return _machine_actor(*found_machine)
        else:
            found = creds.key_role(conn, token)
            if found is not None:
                return Actor("key", found[0], found[1])
    raise AuthenticationError("the API key or machine token is unknown or revoked")


def authorize(actor: Actor, perm: Perm, machine_id: str | None) -> None:
    """Raise 401/403 unless actor may use a route needing perm."""
    if perm is Perm.PUBLIC:
        return
    if actor is ANONYMOUS:
        raise AuthenticationError(
            "credentials required: pass --api-key / NIXFLEET_API_KEY (operators) or the "
            "machine token (agents)"
        )
    if actor.kind == "machine":
        # Machine ids are not secrets: plain equality (compare_digest would raise on non-ASCII).
        is_own = machine_id is not None and actor.name == machine_id
        if perm in (Perm.AGENT, Perm.AGENT_OR_READONLY) and is_own:
            return
        raise PermissionDeniedError(
            f"the token of machine {actor.name!r} may only report for and read that machine"
        )
    if perm is Perm.AGENT:
        raise PermissionDeniedError("only the machine's own agent token may use this route")
    needed = "readonly" if perm is Perm.AGENT_OR_READONLY else perm.value
    if ROLE_RANK.get(actor.role or "", 0) < ROLE_RANK[needed]:
        raise PermissionDeniedError(
            f"key {actor.name!r} has role {actor.role}; this needs {needed} or higher"
        )


class AuthMiddleware:
    def __init__(self, store: AnyStore, cache: ReportCache | None = None) -> None:
        self.store = store
        self.cache = cache

    def process_resource(
        self, req: falcon.Request, resp: falcon.Response, resource: Any, params: dict[str, str]
    ) -> None:
        req.context.actor = ANONYMOUS
        req.context.enroll_token = None
        req.context.cached_machine = None
        if resource is None:
            return
        perms: dict[str, Perm] = getattr(resource, "permissions", {})
        perm = perms.get(req.method)
        if perm is None:
            if req.method == "OPTIONS" or not hasattr(resource, f"on_{req.method.lower()}"):
                return  # Falcon answers 405 (or the Allow list) for methods the resource lacks
            # Fail closed: a responder nobody declared a permission for is nobody's.
            raise PermissionDeniedError(f"{req.method} {req.path} declares no permission")
        if perm is Perm.PUBLIC:
            return
        try:
            token = _bearer(req)
            if perm is Perm.ENROLL:
                self._enroll(req, token)
                return
            req.context.actor = _resolve(self.store, token, self.cache, req.context)
            authorize(req.context.actor, perm, params.get("machine_id"))
        except (AuthenticationError, PermissionDeniedError, GoneError) as e:
            # Names the route and the actor, never the presented secret; %r keeps a
            # hostile path (newlines, escapes) on one line of the log.
            log.info("refused %s %r (%s): %s", req.method, req.path, req.context.actor.label, e)
            raise
        log.debug("%s %r as %s", req.method, req.path, req.context.actor.label)

    def _enroll(self, req: falcon.Request, token: str | None) -> None:
        """The enrollment token may come as the bearer or in the body; keys are refused."""
        if token is None or token.startswith(ENROLL_PREFIX):
            req.context.enroll_token = token
            return
        actor = _resolve(self.store, token)  # 401 when unknown or revoked
        raise PermissionDeniedError(
            f"{actor.label} cannot enroll: this route takes an enrollment token "
            "(`nixfleet enroll-tokens create`); operators register machines with "
            "`nixfleet machines register`"
        )
