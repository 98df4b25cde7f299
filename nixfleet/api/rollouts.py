"""Rollout resources: apply, plan, list, detail, pause/resume/cancel."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import falcon

from nixfleet import policy, rollout, wire
from nixfleet.api.auth import Perm
from nixfleet.api.body import read_json
from nixfleet.api.context import Context
from nixfleet.errors import FieldError, ValidationError
from nixfleet.models import (
    MachineHealth,
    RolloutSpec,
    RolloutStatus,
    isoformat,
    utcnow,
)
from nixfleet.policy import budgets, gate
from nixfleet.store import planning, rollout_control, rollout_files, rollouts
from nixfleet.store import policy as store_policy
from nixfleet.store.conn import Connection
from nixfleet.store.rollouts import BatchDetail, MachineProgress, RolloutDetail, RolloutSummary

STATUSES = [s.value for s in RolloutStatus] + ["invalid"]

# The `warnings` of plan and apply answers (the OpenAPI document shows it).
WARNINGS_SCHEMA: wire.JSONObject = {
    "type": "object",
    "required": ["warnings"],
    "properties": {
        "warnings": {
            "description": "targets that will not follow as things stand: decommissioned "
            "(their reports are refused) or stale (no report for stale_after), by hostname",
            "type": "array",
            "items": {
                "type": "object",
                "required": ["hostname", "kind", "detail", "last_report_at"],
                "properties": {
                    "hostname": {"type": "string"},
                    "kind": {"enum": ["decommissioned", "stale"]},
                    "detail": {"type": "string"},
                    "last_report_at": {"type": ["string", "null"], "format": "date-time"},
                },
            },
        }
    },
}


def warning_json(w: planning.TargetWarning, stale_after: int) -> wire.TargetWarning:
    last = isoformat(w.last_report_at)
    if w.kind == "decommissioned":
        detail = (
            "decommissioned: its reports are refused, so it will not switch "
            "(`skip_lifecycle: [decommissioned]` leaves it out)"
        )
    else:
        detail = (
            f"stale: no report since {last} (stale after {stale_after} s); "
            "it switches only once its agent reports again"
        )
    return {"hostname": w.hostname, "kind": w.kind, "detail": detail, "last_report_at": last}


def _warnings(
    conn: Connection, hosts: Sequence[str], now: datetime, stale_after: int
) -> list[wire.TargetWarning]:
    found = planning.target_warnings(conn, hosts, now, stale_after)
    return [warning_json(w, stale_after) for w in found]


def summary_json(s: RolloutSummary) -> wire.RolloutSummary:
    return {
        "id": s.id,
        "name": s.name,
        "release": s.release,
        "status": s.status.value,
        "source": s.source,
        "created_at": isoformat(s.created_at),
        "created_by": s.created_by,
        "updated_at": isoformat(s.updated_at),
        "machines_pruned_at": isoformat(s.machines_pruned_at),
    }


def listed_json(s: RolloutSummary) -> wire.ListedRollout:
    counts = {h.value: s.machines.get(h, 0) for h in MachineHealth}
    return {**summary_json(s), "machines": {"total": sum(counts.values()), **counts}}


def invalid_file_json(f: rollout_files.InvalidFile) -> wire.InvalidRolloutFile:
    return {
        "id": None,
        "name": f.name,
        "file": f.path,
        "status": "invalid",
        "errors": [e.to_dict() for e in f.errors],
        "updated_at": isoformat(f.checked_at),
    }


def machine_json(m: MachineProgress) -> wire.RolloutMachine:
    out: wire.RolloutMachine = {
        "id": m.id,
        "health": m.health.value,
        "reason": m.reason,
        "store_path": m.store_path,
        "current_generation": m.current_generation,
        "last_report_at": isoformat(m.last_report_at),
    }
    if m.failed_output is not None:
        out["failed_output"] = m.failed_output
    return out


def batch_counts(b: BatchDetail) -> dict[str, int]:
    """Machines by health: kept by a condensed rollout's batch, else counted."""
    if b.counts is not None:
        return {h.value: b.counts.get(h, 0) for h in MachineHealth}
    counts = {h.value: 0 for h in MachineHealth}
    for m in b.machines:
        counts[m.health.value] += 1
    return counts


def detail_json(d: RolloutDetail) -> wire.Rollout:
    return {
        **summary_json(d.summary),
        "document": d.document,
        "skipped": [{"hostname": s.hostname, "reason": s.reason} for s in d.skipped],
        "hold": None if d.hold is None else {"kind": d.hold[0], "detail": d.hold[1]},
        "batches": [
            {
                "index": b.index,
                "status": b.status.value,
                "size": b.size,
                "started_at": isoformat(b.started_at),
                "finished_at": isoformat(b.finished_at),
                "machines": [machine_json(m) for m in b.machines],
                "counts": batch_counts(b),
            }
            for b in d.batches
        ],
        "events": [
            {
                "at": isoformat(e.at),
                "kind": e.kind,
                "batch": e.batch,
                "machine": e.machine,
                "detail": e.detail,
            }
            for e in d.events
        ],
    }


def plan_json(
    spec: RolloutSpec,
    p: rollout.Plan,
    outlook: Sequence[gate.Outlook] = (),
    windowed: bool = False,
    warnings: Sequence[wire.TargetWarning] = (),
) -> wire.Plan:
    """The plan; with §11 policy, per batch its earliest start (when windows apply) and,
    when a budget would hold it, how many of its machines start at once and why."""
    batches: list[wire.PlannedBatch] = [
        {"index": i, "size": len(hosts), "hosts": list(hosts)} for i, hosts in enumerate(p.batches)
    ]
    for b, o in zip(batches, outlook, strict=False):  # DESIGN §11: time and holds
        if windowed:
            b["earliest_start"] = isoformat(o.earliest)
            b["waiting_for_window"] = o.waiting_for
        if o.held_by is not None:
            b["at_once"] = o.at_once
            b["held_by"] = o.held_by
    return {
        "name": spec.name,
        "release": spec.release,
        "strategy": spec.strategy.value,
        "targets": len(p.targets),
        "batches": batches,
        "skipped": [{"hostname": s.hostname, "reason": s.reason} for s in p.skipped],
        "warnings": list(warnings),
    }


class RolloutCollection:
    permissions = {"GET": Perm.READONLY, "POST": Perm.DEPLOY}
    schemas = {"POST": rollout.SCHEMA}
    answers = {"POST": WARNINGS_SCHEMA}

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
            listed: list[wire.RolloutListItem] = [
                listed_json(r) for r in rollouts.list_rollouts(conn, status)
            ]
            if status in (None, "invalid"):
                listed += [invalid_file_json(f) for f in rollout_files.invalid_files(conn)]
        resp.media = {"rollouts": listed}

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Apply a rollout document; idempotent by name and content (200 when unchanged)."""
        doc = read_json(req, self.ctx.limit)
        now = utcnow()
        with self.ctx.store.transaction() as conn:
            applied = rollouts.apply(
                conn, doc, req.context.actor.label, now, self.ctx.settings.rollout_poll_hint
            )
            out = detail_json(rollouts.detail(conn, applied.id, now))
            hosts = [m["id"] for b in out["batches"] for m in b["machines"]]
            warnings = _warnings(conn, hosts, now, self.ctx.settings.stale_after)
        resp.status = falcon.HTTP_201 if applied.created else falcon.HTTP_200
        resp.location = f"/api/v1/rollouts/{applied.id}"
        answer: wire.AppliedRollout = {**out, "created": applied.created, "warnings": warnings}
        resp.media = answer


class RolloutPlan:
    permissions = {"POST": Perm.READONLY}
    schemas = {"POST": rollout.SCHEMA}
    answers = {"POST": WARNINGS_SCHEMA}

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        """The batches `apply` would create, and the hosts it would skip; changes nothing."""
        doc = read_json(req, self.ctx.limit)
        spec = planning.spec_of(doc)
        settings, now = self.ctx.settings, utcnow()
        fleet = settings.fleet_policy
        own = policy.from_document(doc)
        with self.ctx.store.read() as conn:
            p, _ = planning.make_plan(conn, spec)
            tags, down, flight = store_policy.plan_facts(
                conn, p.targets, now, settings.stale_after, fleet.budgets
            )
            warnings = _warnings(conn, p.targets, now, settings.stale_after)
        limits = budgets.rooms(own.max_unavailable, len(p.targets), down, fleet.budgets, flight)
        windows = fleet.windows_for(own.windows, spec.target_tags)
        outlook = gate.outlook(
            [[tags.get(h, frozenset()) for h in b] for b in p.batches],
            windows,
            settings.policy_now(now),
            spec.health_timeout,
            spec.soak,
            limits,
        )
        resp.media = plan_json(spec, p, outlook, windowed=bool(windows), warnings=warnings)


class RolloutItem:
    permissions = {"GET": Perm.READONLY}

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response, rollout_id: str) -> None:
        """One rollout (by id or name): batches, per-machine health and reasons, events."""
        with self.ctx.store.read() as conn:
            out = rollouts.detail(conn, rollouts.resolve(conn, rollout_id), utcnow())
        resp.media = detail_json(out)


class _Control:
    permissions = {"POST": Perm.DEPLOY}
    action = ""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def _run(self, req: falcon.Request, resp: falcon.Response, rollout_id: str) -> None:
        now = utcnow()
        with self.ctx.store.transaction() as conn:
            rid = rollout_control.control(
                conn,
                rollout_id,
                self.action,
                req.context.actor.label,
                now,
                self.ctx.settings.rollout_poll_hint,
            )
            out = rollouts.detail(conn, rid, now)
        resp.media = detail_json(out)


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
