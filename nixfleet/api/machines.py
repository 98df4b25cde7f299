"""Machine resources: registration, lifecycle, tags, desired generation, reports."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import falcon

from nixfleet import filters, wire
from nixfleet.api.auth import Perm
from nixfleet.api.body import read_document
from nixfleet.api.context import Context
from nixfleet.api.history import event_json
from nixfleet.errors import ConflictError, FieldError, ValidationError
from nixfleet.filters import MachineFilter
from nixfleet.models import (
    Health,
    Lifecycle,
    Machine,
    Sync,
    health_of,
    isoformat,
    utcnow,
    validate_hostname,
)
from nixfleet.store import audit, credentials, history, machines
from nixfleet.store.conn import Connection

LATEST_EVENTS = 20  # events a machine's detail ends with (GET /api/v1/machines/{id})


def status_json(m: Machine, now: datetime, stale_after: int) -> wire.StatusMachine:
    """A machine's entry in GET /api/v1/status (docs/fleet-status.md): the definition.

    The status route has SQL write these entries for the whole fleet at once
    (store.status.STATUS_SQL, held to this function machine by machine).
    """
    return {
        "id": m.id,
        "lifecycle": m.lifecycle.value,
        "current_generation": m.current_generation,
        "desired_generation": m.desired_generation,
        "sync": m.sync.value,
        "health_status": health_of(m.health).value,
        "failed_generation": m.failed_generation,
        "system_state": m.system_state.value,
        "last_message": m.last_message,
        "needs_reboot": m.needs_reboot,
        "tags": list(m.tags),
        "last_report_at": isoformat(m.last_report_at),
        "stale": m.stale(now, stale_after),
    }


def machine_json(m: Machine, now: datetime, stale_after: int) -> wire.Machine:
    """The full machine: its status entry, plus tags by source, desired source, times."""
    return {
        **status_json(m, now, stale_after),
        "agent_tags": list(m.agent_tags),
        "operator_tags": list(m.operator_tags),
        "desired_cache_url": m.desired_cache_url,
        "desired_source": m.desired_source,
        "last_success": m.last_success,
        "agent_version": m.agent_version,
        "registered_at": isoformat(m.registered_at),
        "retry_requested_at": isoformat(m.retry_requested_at),
        "booted_generation": m.booted_generation,
    }


# Returns the audit detail, or None when nothing changed (no audit row: a no-op).
Change = Callable[[Connection, Machine, datetime], wire.JSONObject | None]


def mutate(
    ctx: Context,
    req: falcon.Request,
    resp: falcon.Response,
    machine_id: str,
    action: str,
    change: Change,
) -> None:
    """One machine mutation: one transaction, one audit row, the machine as the answer.

    change(conn, machine_before, now) writes and returns the audit detail (None: it
    changed nothing, so no audit row); the machine is read first, so an unknown id
    is a 404 before anything is written.
    """
    now = utcnow()
    with ctx.store.transaction() as conn:
        detail = change(conn, machines.get(conn, machine_id), now)
        if detail is not None:
            audit.record(conn, req.context.actor.label, action, machine_id, now, detail)
        after = machines.get(conn, machine_id)
    resp.media = machine_json(after, now, ctx.settings.stale_after)


def filter_params(req: falcon.Request) -> MachineFilter:
    """The filters.MachineFilter a query string names (FILTER_QUERY documents it).

    `?tag=a&tag=b` and `?tag=a,b` both mean: carrying a and b; `!c` excludes.
    """
    tags = ",".join(req.get_param_as_list("tag") or [])
    direction = req.get_param("dir") or "asc"
    if direction not in ("asc", "desc"):
        raise ValidationError(
            f"invalid dir {direction[:64]!r}: allowed asc, desc",
            errors=[FieldError("dir", "one of: asc, desc")],
        )
    return filters.parse(
        tags=tags,
        lifecycle=req.get_param("lifecycle"),
        sync=req.get_param("sync"),
        health=req.get_param("health"),
        stale=req.get_param("stale"),
        host=req.get_param("host"),
        sort=req.get_param("sort"),
        descending=direction == "desc",
        names={"tags": "tag"},
    )


# The query string of the two fleet reads, for the OpenAPI document.
FILTER_QUERY = [
    ("tag", "string", "tags, comma-separated or repeated: all must match; `!tag` excludes"),
    ("lifecycle", "string", f"one of: {', '.join(Lifecycle)}"),
    ("sync", "string", f"one of: {', '.join(filters.sync_word(s) for s in Sync)}"),
    ("health", "string", f"one of: {', '.join(Health)}"),
    ("stale", "string", "true (only stale machines) or false (none)"),
    ("host", "string", "a host name glob (`web-*`), or a case-insensitive substring"),
    ("sort", "string", f"one of: {', '.join(filters.SORT_KEYS)} (default host)"),
    ("dir", "string", "asc (default) or desc"),
]


class MachineCollection:
    permissions = {"GET": Perm.READONLY, "POST": Perm.ADMIN}
    schemas = {"POST": "machine-register"}
    query = {"GET": FILTER_QUERY}

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """List machines, filtered as GET /api/v1/status filters (docs/fleet-status.md)."""
        f = filter_params(req)
        now = utcnow()
        stale = self.ctx.settings.stale_after
        with self.ctx.store.read() as conn:
            found = machines.list_filtered(conn, f, now, stale)
        resp.media = {"machines": [machine_json(m, now, stale) for m in found]}

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Register a machine, optionally issuing its agent token (shown once)."""
        doc = read_document(req, self.schemas["POST"], self.ctx.limit, "registration")
        machine_id = doc["id"]
        now = utcnow()
        lifecycle = Lifecycle(doc.get("lifecycle", "pending"))
        with self.ctx.store.transaction() as conn:
            machines.register(conn, machine_id, doc.get("tags", []), lifecycle, now)
            token = (
                credentials.issue_token(conn, machine_id, now) if doc.get("issue_token") else None
            )
            audit.record(
                conn,
                req.context.actor.label,
                "machine.register",
                machine_id,
                now,
                {"lifecycle": lifecycle.value, "tags": doc.get("tags", []), "token": bool(token)},
            )
            machine = machines.get(conn, machine_id)
        out = machine_json(machine, now, self.ctx.settings.stale_after)
        resp.media = {**out, "token": token} if token else out
        resp.status = falcon.HTTP_201
        resp.location = f"/api/v1/machines/{machine_id}"


class MachineItem:
    permissions = {"GET": Perm.READONLY}

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response, machine_id: str) -> None:
        """One machine with its latest history events (oldest first)."""
        validate_hostname(machine_id)
        now = utcnow()
        with self.ctx.store.read() as conn:
            m = machines.get(conn, machine_id)
            latest = history.latest(conn, machine_id, LATEST_EVENTS)
        resp.media = {
            **machine_json(m, now, self.ctx.settings.stale_after),
            "health": None if m.health is None else m.health.to_dict(),
            "uptime_seconds": m.uptime_seconds,
            "history": [event_json(e) for e in latest],
            "failed_output": m.failed_output,
        }


class MachineLifecycle:
    permissions = {"PATCH": Perm.ADMIN}
    schemas = {"PATCH": "machine-lifecycle"}

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def on_patch(self, req: falcon.Request, resp: falcon.Response, machine_id: str) -> None:
        """Change the lifecycle state; invalid transitions get 409 naming the allowed ones."""
        validate_hostname(machine_id)
        doc = read_document(req, self.schemas["PATCH"], self.ctx.limit, "lifecycle change")
        target = Lifecycle(doc["lifecycle"])

        actor = req.context.actor.label

        def change(conn: Connection, before: Machine, now: datetime) -> wire.JSONObject | None:
            previous = machines.set_lifecycle(conn, machine_id, target, actor, now)
            if previous is target:
                return None  # already there: a no-op that scripts may repeat
            # A decommissioned machine keeps its token: with it, its agent is told 410
            # Gone (api.auth) on every request, and backs off to one attempt an hour.
            return {"from": previous.value, "to": target.value}

        mutate(self.ctx, req, resp, machine_id, "machine.lifecycle", change)


class MachineTags:
    permissions = {"POST": Perm.ADMIN, "DELETE": Perm.ADMIN}
    schemas = {"POST": "machine-tags", "DELETE": "machine-tags"}

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def _change(
        self, req: falcon.Request, resp: falcon.Response, machine_id: str, add: bool
    ) -> None:
        validate_hostname(machine_id)
        tags = read_document(req, self.schemas[req.method], self.ctx.limit, "tags")["tags"]

        actor = req.context.actor.label

        def change(conn: Connection, before: Machine, now: datetime) -> wire.JSONObject:
            if add:
                added, _ = machines.set_tags(conn, machine_id, tags, "operator", replace=False)
                history.tags_changed(conn, machine_id, now, actor, "operator", added, [])
            else:
                from_config = [
                    t for t in tags if t in before.agent_tags and t not in before.operator_tags
                ]
                if from_config:
                    raise ConflictError(
                        f"tag {', '.join(from_config)} of {machine_id} comes from the machine's "
                        "NixOS config (services.nixfleet-agent.tags): remove it there; "
                        "operators remove only the tags they added"
                    )
                removed = machines.remove_tags(conn, machine_id, tags)
                history.tags_changed(conn, machine_id, now, actor, "operator", [], removed)
            return {"tags": tags}

        mutate(self.ctx, req, resp, machine_id, "machine.tag" if add else "machine.untag", change)

    def on_post(self, req: falcon.Request, resp: falcon.Response, machine_id: str) -> None:
        """Add operator tags."""
        self._change(req, resp, machine_id, add=True)

    def on_delete(self, req: falcon.Request, resp: falcon.Response, machine_id: str) -> None:
        """Remove operator tags (agent tags come from the NixOS config)."""
        self._change(req, resp, machine_id, add=False)


class DesiredGeneration:
    permissions = {"GET": Perm.AGENT_OR_READONLY, "PUT": Perm.DEPLOY, "DELETE": Perm.ADMIN}
    schemas = {"PUT": "desired-generation"}

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response, machine_id: str) -> None:
        """The generation this machine should run, and where to fetch it."""
        validate_hostname(machine_id)
        with self.ctx.store.read() as conn:
            m = machines.get(conn, machine_id)
        resp.media = {
            "desired_generation": m.desired_generation,
            "cache_url": m.desired_cache_url,
            "source": m.desired_source,
        }

    def on_put(self, req: falcon.Request, resp: falcon.Response, machine_id: str) -> None:
        """Set the desired generation by hand (outside any rollout)."""
        validate_hostname(machine_id)
        doc = read_document(req, self.schemas["PUT"], self.ctx.limit, "desired generation")
        self._set(req, resp, machine_id, doc["store_path"], doc.get("cache_url"), "operator")

    def on_delete(self, req: falcon.Request, resp: falcon.Response, machine_id: str) -> None:
        """Clear the desired generation: the agent keeps what it runs."""
        validate_hostname(machine_id)
        self._set(req, resp, machine_id, None, None, None)

    def _set(
        self,
        req: falcon.Request,
        resp: falcon.Response,
        machine_id: str,
        path: str | None,
        cache_url: str | None,
        source: str | None,
    ) -> None:
        actor = req.context.actor.label

        def change(conn: Connection, before: Machine, now: datetime) -> wire.JSONObject:
            machines.set_desired(conn, machine_id, path, cache_url, source, now, actor)
            return {"from": before.desired_generation, "to": path, "cache_url": cache_url}

        action = "machine.set-desired" if path else "machine.clear-desired"
        mutate(self.ctx, req, resp, machine_id, action, change)


class MachineRetry:
    permissions = {"POST": Perm.DEPLOY}

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def on_post(self, req: falcon.Request, resp: falcon.Response, machine_id: str) -> None:
        """Ask the agent to retry a desired generation that failed on it."""
        validate_hostname(machine_id)

        def change(conn: Connection, before: Machine, now: datetime) -> wire.JSONObject:
            machines.request_retry(conn, machine_id, now)
            return {"failed_generation": before.failed_generation}

        mutate(self.ctx, req, resp, machine_id, "machine.retry", change)
