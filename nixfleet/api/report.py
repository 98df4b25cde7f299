"""POST /api/v1/machines/{id}/report: the hot path (DESIGN §1, §8).

A heartbeat (nixfleet.heartbeat) is answered from the process's memory
(api.report_cache) and its last-seen time written in a batch within a second;
every other report is one transaction, committed before its answer.
"""

from __future__ import annotations

import falcon

from nixfleet.api.auth import Perm
from nixfleet.api.body import read_document
from nixfleet.api.context import Context
from nixfleet.api.report_cache import answer
from nixfleet.models import HealthResult, Report, utcnow, validate_hostname
from nixfleet.store import audit, machines


class MachineReport:
    permissions = {"POST": Perm.AGENT}
    schemas = {"POST": "report"}

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def on_post(self, req: falcon.Request, resp: falcon.Response, machine_id: str) -> None:
        """Agent report; the answer is the desired generation, cache URL and poll hint."""
        validate_hostname(machine_id)
        doc = read_document(req, self.schemas["POST"], self.ctx.limit, "report")
        now = utcnow()
        cache = self.ctx.cache
        if cache is not None:
            known = cache.heartbeat(machine_id, doc, now, req.context.cached_machine)
            if known is not None:
                resp.data = known  # JSON (falcon.MEDIA_JSON, the app's default type)
                return
        health = doc.get("health")
        tags = doc.get("tags")
        report = Report(
            machine_id=machine_id,
            received_at=now,
            current_generation=doc["current_generation"],
            success=doc.get("success", True),
            message=doc.get("message", ""),
            attempted_generation=doc.get("attempted_generation"),
            health=HealthResult.from_dict(health) if health is not None else None,
            tags=tuple(tags) if tags is not None else None,
            agent_version=doc.get("agent_version"),
            uptime_seconds=doc.get("uptime_seconds"),
            output=doc.get("output"),
            needs_reboot=doc.get("needs_reboot"),
            booted_generation=doc.get("booted_generation"),
        )
        with self.ctx.store.transaction() as conn:
            row, promoted = machines.record_report(conn, report)
            if promoted is not None:
                audit.record(
                    conn,
                    req.context.actor.label,
                    "machine.lifecycle",
                    machine_id,
                    now,
                    {"from": promoted.value, "to": "active", "reason": "first agent report"},
                )
        if cache is not None:
            cache.stored(machine_id)
        resp.media = answer(
            row["desired_generation"],
            row["desired_cache_url"],
            row["poll_hint"] or self.ctx.settings.default_poll_interval,
            row["retry_requested_at"],
            row["reboot"],
            row["confirm_timeout"],
        )
