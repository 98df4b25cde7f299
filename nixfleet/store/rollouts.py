"""Rollouts in the database: plan, apply, read, pause/resume/cancel, events.

Deciding is nixfleet.rollout's job; this module reads the facts it needs and
writes what was decided, set-based (one statement per batch, never one per
machine in a loop), inside the caller's transaction.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from nixfleet import policy, rollout, schemas
from nixfleet.errors import ConflictError, FieldError, NotFoundError, ValidationError
from nixfleet.models import (
    BatchStatus,
    Lifecycle,
    MachineHealth,
    RolloutSpec,
    RolloutStatus,
    is_release_id,
    isoformat,
    parse_time,
)
from nixfleet.policy.reboot import RebootPolicy
from nixfleet.store import audit, releases
from nixfleet.store.verdicts import FACTS_SQL, facts_of


def source_label(name: str) -> str:
    """What machines.desired_source says for generations a rollout set."""
    return f"rollout:{name}"


def spec_of(doc: Any, what: str = "rollout") -> RolloutSpec:
    """Validate a rollout document and turn it into a RolloutSpec."""
    schemas.validate("rollout", doc, what)
    policy.validate(doc, what)
    return rollout.spec_from_document(doc)


# --- planning -----------------------------------------------------------------------


def _tagged(conn: sqlite3.Connection, tags: Sequence[str]) -> dict[str, Lifecycle]:
    wanted = sorted(set(tags))
    if not wanted:
        return {}
    marks = ",".join("?" * len(wanted))
    rows = conn.execute(
        f"SELECT m.id, m.lifecycle FROM machines m WHERE m.id IN (SELECT machine_id FROM "
        f"machine_tags WHERE tag IN ({marks}) GROUP BY machine_id "
        "HAVING COUNT(DISTINCT tag) = ?)",
        (*wanted, len(wanted)),
    )
    return {r[0]: Lifecycle(r[1]) for r in rows}


def _lifecycles(conn: sqlite3.Connection, hosts: Iterable[str]) -> dict[str, Lifecycle]:
    hosts = list(hosts)
    if not hosts:
        return {}
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS wanted_hosts (id TEXT PRIMARY KEY)")
    conn.execute("DELETE FROM wanted_hosts")
    conn.executemany("INSERT OR IGNORE INTO wanted_hosts VALUES (?)", ((h,) for h in hosts))
    rows = conn.execute(
        "SELECT m.id, m.lifecycle FROM machines m JOIN wanted_hosts w ON w.id = m.id"
    ).fetchall()
    conn.execute("DELETE FROM wanted_hosts")
    return {r[0]: Lifecycle(r[1]) for r in rows}


def make_plan(conn: sqlite3.Connection, spec: RolloutSpec) -> tuple[rollout.Plan, dict[str, str]]:
    """The plan for a spec against the current fleet; also hostname -> store path."""
    if not is_release_id(spec.release):
        raise ValidationError(
            "the control plane takes a release id, not a file",
            errors=[
                FieldError(
                    "release",
                    f"{spec.release!r} is a path: register it first (`nixfleet rollout apply` "
                    "does this for you) and use its id",
                )
            ],
        )
    paths = releases.store_paths(conn, spec.release)
    if not paths:
        releases.get(conn, spec.release)  # 404 with guidance
    tagged = _tagged(conn, spec.target_tags) if spec.target_tags else {}
    lifecycles = {**tagged, **_lifecycles(conn, spec.target_hosts)}
    p = rollout.plan(spec, spec.release, paths, tagged, lifecycles)
    return p, paths


def plan_json(spec: RolloutSpec, p: rollout.Plan) -> dict[str, Any]:
    return {
        "name": spec.name,
        "release": spec.release,
        "strategy": spec.strategy.value,
        "targets": len(p.targets),
        "batches": [
            {"index": i, "size": len(hosts), "hosts": list(hosts)}
            for i, hosts in enumerate(p.batches)
        ],
        "skipped": [{"hostname": s.hostname, "reason": s.reason} for s in p.skipped],
    }


# --- apply --------------------------------------------------------------------------


@dataclass(frozen=True)
class Applied:
    id: str
    created: bool


def _overlaps(conn: sqlite3.Connection, targets: Sequence[str]) -> dict[str, str]:
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS new_targets (id TEXT PRIMARY KEY)")
    conn.execute("DELETE FROM new_targets")
    conn.executemany("INSERT OR IGNORE INTO new_targets VALUES (?)", ((t,) for t in targets))
    rows = conn.execute(
        "SELECT rm.machine_id, r.name FROM rollout_machines rm "
        "JOIN new_targets n ON n.id = rm.machine_id "
        "JOIN rollouts r ON r.id = rm.rollout_id WHERE r.status IN ('running', 'paused')"
    ).fetchall()
    conn.execute("DELETE FROM new_targets")
    return {r[0]: r[1] for r in rows}


def latest_by_name(conn: sqlite3.Connection, name: str) -> sqlite3.Row | None:
    row: sqlite3.Row | None = conn.execute(
        "SELECT id, status, document_hash FROM rollouts WHERE name = ? "
        "ORDER BY created_at DESC, rowid DESC LIMIT 1",
        (name,),
    ).fetchone()
    return row


def apply(
    conn: sqlite3.Connection,
    doc: Mapping[str, Any],
    actor: str,
    now: datetime,
    poll_hint: int,
    source: str = "api",
) -> Applied:
    """Create the rollout a document describes; the same document again is a no-op."""
    spec = spec_of(doc)
    doc_hash = rollout.document_hash(doc)
    rid = rollout.rollout_id(spec.name, doc_hash)
    if conn.execute("SELECT 1 FROM rollouts WHERE id = ?", (rid,)).fetchone():
        return Applied(rid, created=False)
    latest = latest_by_name(conn, spec.name)
    if latest is not None and RolloutStatus(latest["status"]).active:
        raise ConflictError(
            f"rollout {spec.name!r} is {latest['status']} with a different document; "
            f"cancel it (`nixfleet rollout cancel {spec.name}`) or use a new name"
        )
    p, paths = make_plan(conn, spec)
    if not p.targets:
        skipped = "; ".join(f"{s.hostname}: {s.reason}" for s in p.skipped[:10])
        raise ValidationError(
            f"rollout {spec.name!r} targets no machine",
            errors=[FieldError("target", f"matches no deployable machine. {skipped}".strip())],
        )
    conflicts = _overlaps(conn, p.targets)
    if conflicts:
        raise rollout.overlap_error(conflicts)
    at = isoformat(now)
    conn.execute(
        "INSERT INTO rollouts (id, name, release_id, status, document_json, document_hash, "
        "skipped_json, source, created_at, created_by, updated_at) "
        "VALUES (?, ?, ?, 'running', ?, ?, ?, ?, ?, ?, ?)",
        (
            rid,
            spec.name,
            spec.release,
            json.dumps(doc, sort_keys=True),
            doc_hash,
            json.dumps([{"hostname": s.hostname, "reason": s.reason} for s in p.skipped]),
            source,
            at,
            actor,
            at,
        ),
    )
    if doc.get("reboot"):  # a column, so the report path reads it without the document
        conn.execute("UPDATE rollouts SET reboot = ? WHERE id = ?", (doc["reboot"], rid))
    conn.executemany(
        "INSERT INTO rollout_batches (rollout_id, idx, size, status) VALUES (?, ?, ?, 'pending')",
        [(rid, i, len(b)) for i, b in enumerate(p.batches)],
    )
    # prev_* starts as a copy of each machine's desired generation now; a batch's
    # first start re-copies only what changed since (reconciler._start_batch).
    conn.executemany(
        "INSERT INTO rollout_machines (rollout_id, machine_id, batch_idx, position, store_path, "
        "prev_generation, prev_cache_url, prev_source) SELECT ?, id, ?, ?, ?, "
        "desired_generation, desired_cache_url, desired_source FROM machines WHERE id = ?",
        (
            (rid, i, pos, paths[host], host)
            for pos, (i, host) in enumerate((i, h) for i, b in enumerate(p.batches) for h in b)
        ),
    )
    set_poll_hint(conn, rid, poll_hint)
    detail = {
        "name": spec.name,
        "release": spec.release,
        "targets": len(p.targets),
        "batches": [len(b) for b in p.batches],
        "skipped": len(p.skipped),
        "source": source,
    }
    add_events(conn, rid, now, [rollout.Event("rollout-created", detail=detail)], actor)
    return Applied(rid, created=True)


def set_poll_hint(conn: sqlite3.Connection, rollout_id: str, hint: int | None) -> None:
    """Short polls while a rollout runs; NULL (the agent's own interval) otherwise.

    One row: the report path reads the hint of the running rollout a machine is in
    (machines.record_report), so no machine row is written here.
    """
    conn.execute("UPDATE rollouts SET poll_hint = ? WHERE id = ?", (hint, rollout_id))


def add_events(
    conn: sqlite3.Connection,
    rollout_id: str,
    now: datetime,
    events: Sequence[rollout.Event],
    actor: str,
) -> None:
    """Each state change: a rollout_events row and an audit row."""
    at = isoformat(now)
    conn.executemany(
        "INSERT INTO rollout_events (rollout_id, at, kind, batch_idx, machine_id, detail_json) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        [
            (rollout_id, at, e.kind, e.batch, e.machine_id, json.dumps(dict(e.detail), default=str))
            for e in events
        ],
    )
    for e in events:
        detail: dict[str, Any] = {**e.detail, "rollout": rollout_id}
        if e.batch is not None:
            detail["batch"] = e.batch
        if e.machine_id is not None:
            detail["machine"] = e.machine_id
        audit.record(conn, actor, f"rollout.{e.kind}", rollout_id, now, detail)


# --- reading ------------------------------------------------------------------------


def resolve(conn: sqlite3.Connection, ref: str) -> str:
    """A rollout id from an id or a name (the newest rollout of that name)."""
    row = conn.execute("SELECT id FROM rollouts WHERE id = ?", (ref,)).fetchone()
    if row is None:
        row = latest_by_name(conn, ref)
    if row is None:
        raise NotFoundError(f"no rollout {ref!r}; see `nixfleet rollout list`")
    return str(row["id"])


def summary_row(r: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": r["id"],
        "name": r["name"],
        "release": r["release_id"],
        "status": r["status"],
        "source": r["source"],
        "created_at": r["created_at"],
        "created_by": r["created_by"],
        "updated_at": r["updated_at"],
    }


def list_rollouts(conn: sqlite3.Connection, status: str | None = None) -> list[dict[str, Any]]:
    """Rollouts newest first, with per-rollout machine counts, plus invalid GitOps files."""
    where, params = ("WHERE r.status = ?", [status]) if status else ("", [])
    rows = conn.execute(
        f"SELECT r.* FROM rollouts r {where} ORDER BY r.created_at DESC, r.rowid DESC", params
    ).fetchall()
    counts: dict[str, dict[str, int]] = {}
    for rid, health, n in conn.execute(
        "SELECT rollout_id, health, COUNT(*) FROM rollout_machines GROUP BY rollout_id, health"
    ):
        counts.setdefault(rid, {h.value: 0 for h in MachineHealth})[health] = n
    out = []
    for r in rows:
        item = summary_row(r)
        c = counts.get(r["id"], {h.value: 0 for h in MachineHealth})
        item["machines"] = {"total": sum(c.values()), **c}
        out.append(item)
    if status in (None, "invalid"):
        for f in conn.execute(
            "SELECT path, name, errors_json, checked_at FROM rollout_files "
            "WHERE status = 'invalid' ORDER BY path"
        ):
            out.append(
                {
                    "id": None,
                    "name": f["name"],
                    "file": f["path"],
                    "status": "invalid",
                    "errors": json.loads(f["errors_json"]),
                    "updated_at": f["checked_at"],
                }
            )
    return out


def load_view(conn: sqlite3.Connection, rollout_id: str) -> rollout.RolloutView:
    row = conn.execute(
        "SELECT id, name, status, document_json FROM rollouts WHERE id = ?", (rollout_id,)
    ).fetchone()
    if row is None:
        raise NotFoundError(f"no rollout {rollout_id!r}; see `nixfleet rollout list`")
    batches = tuple(
        rollout.BatchView(b[0], BatchStatus(b[1]), b[2], parse_time(b[3]))
        for b in conn.execute(
            "SELECT idx, status, size, started_at FROM rollout_batches WHERE rollout_id = ? "
            "ORDER BY idx",
            (rollout_id,),
        )
    )
    doc = json.loads(row["document_json"])
    spec = rollout.spec_from_document(doc)
    return rollout.RolloutView(
        row["id"],
        row["name"],
        RolloutStatus(row["status"]),
        spec,
        batches,
        policy.from_document(doc),
    )


def detail(conn: sqlite3.Connection, rollout_id: str, now: datetime) -> dict[str, Any]:
    """Everything `rollout status` shows: batches, per-machine health with reasons, events."""
    row = conn.execute("SELECT * FROM rollouts WHERE id = ?", (rollout_id,)).fetchone()
    if row is None:
        raise NotFoundError(f"no rollout {rollout_id!r}; see `nixfleet rollout list`")
    view = load_view(conn, rollout_id)
    out = summary_row(row)
    out["document"] = json.loads(row["document_json"])
    out["skipped"] = json.loads(row["skipped_json"])
    spec = view.spec
    rebooting = view.policy.reboot is RebootPolicy.WHEN_NEEDED
    machines: dict[int, list[dict[str, Any]]] = {}
    for r in conn.execute(
        FACTS_SQL + "WHERE rm.rollout_id = ? ORDER BY rm.position", (rollout_id,)
    ):
        f = facts_of(r)
        batch = view.batches[r[11]]
        reason = r[10] or ""
        if f.health is MachineHealth.PENDING:
            if batch.status is BatchStatus.DEPLOYING and batch.started_at is not None:
                reason = rollout.judge(
                    f, batch.started_at, now, spec.health_timeout, spec.soak, rebooting
                ).reason
            else:
                reason = f"batch {batch.status}"
        machines.setdefault(r[11], []).append(
            {
                "id": f.machine_id,
                "health": f.health.value,
                "reason": reason,
                "store_path": f.store_path,
                "current_generation": f.current_generation,
                "last_report_at": isoformat(f.last_report_at),
            }
        )
    times = {
        b[0]: (b[1], b[2])
        for b in conn.execute(
            "SELECT idx, started_at, finished_at FROM rollout_batches WHERE rollout_id = ?",
            (rollout_id,),
        )
    }
    out["batches"] = [
        {
            "index": b.index,
            "status": b.status.value,
            "size": b.size,
            "started_at": times[b.index][0],
            "finished_at": times[b.index][1],
            "machines": machines.get(b.index, []),
        }
        for b in view.batches
    ]
    out["events"] = [
        {
            "at": e["at"],
            "kind": e["kind"],
            "batch": e["batch_idx"],
            "machine": e["machine_id"],
            "detail": json.loads(e["detail_json"]),
        }
        for e in conn.execute(
            "SELECT at, kind, batch_idx, machine_id, detail_json FROM rollout_events "
            "WHERE rollout_id = ? ORDER BY id DESC LIMIT 200",
            (rollout_id,),
        )
    ][::-1]
    return out


# --- operator control ---------------------------------------------------------------


def control(
    conn: sqlite3.Connection,
    ref: str,
    action: str,
    actor: str,
    now: datetime,
    poll_hint: int,
) -> str:
    """Pause, resume or cancel; resume re-runs failed batches. Returns the rollout id."""
    rid = resolve(conn, ref)
    row = conn.execute("SELECT name, status FROM rollouts WHERE id = ?", (rid,)).fetchone()
    current = RolloutStatus(row["status"])
    target = rollout.control(row["name"], current, action)
    at = isoformat(now)
    kind = "rollout-resumed" if action == "resume" else f"rollout-{target.value}"
    events = [rollout.Event(kind, detail={"from": current.value, "to": target.value})]
    if action == "resume":
        failed = [
            r[0]
            for r in conn.execute(
                "SELECT idx FROM rollout_batches WHERE rollout_id = ? AND status = 'failed'",
                (rid,),
            )
        ]
        conn.execute(
            "UPDATE rollout_machines SET health = 'pending', reason = NULL, healthy_since = NULL, "
            "decided_at = NULL WHERE rollout_id = ? AND health != 'healthy' AND batch_idx IN "
            "(SELECT idx FROM rollout_batches WHERE rollout_id = ? AND status = 'failed')",
            (rid, rid),
        )
        conn.execute(
            "UPDATE rollout_batches SET status = 'pending', finished_at = NULL "
            "WHERE rollout_id = ? AND status = 'failed'",
            (rid,),
        )
        # A batch paused mid-way gets a fresh health window: only new reports count.
        conn.execute(
            "UPDATE rollout_batches SET started_at = ? "
            "WHERE rollout_id = ? AND status = 'deploying'",
            (at, rid),
        )
        events.extend(rollout.Event("batch-requeued", i) for i in failed)
    if action == "cancel":
        conn.execute(
            "UPDATE rollout_batches SET status = 'cancelled', finished_at = ? "
            "WHERE rollout_id = ? AND status IN ('pending', 'deploying')",
            (at, rid),
        )
    conn.execute(
        "UPDATE rollouts SET status = ?, updated_at = ? WHERE id = ?", (target.value, at, rid)
    )
    set_poll_hint(conn, rid, poll_hint if target is RolloutStatus.RUNNING else None)
    add_events(conn, rid, now, events, actor)
    return rid


# --- GitOps file records ----------------------------------------------------------------


def record_file(
    conn: sqlite3.Connection,
    path: str,
    now: datetime,
    *,
    name: str | None,
    rollout_id: str | None,
    errors: Sequence[Mapping[str, Any]] = (),
    mtime_ns: int | None = None,
) -> None:
    conn.execute(
        "INSERT INTO rollout_files (path, status, name, rollout_id, errors_json, mtime_ns, "
        "checked_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (path) DO UPDATE SET "
        "status = excluded.status, name = excluded.name, rollout_id = excluded.rollout_id, "
        "errors_json = excluded.errors_json, mtime_ns = excluded.mtime_ns, "
        "checked_at = excluded.checked_at",
        (
            path,
            "invalid" if errors else "applied",
            name,
            rollout_id,
            json.dumps(list(errors)),
            mtime_ns,
            isoformat(now),
        ),
    )


def forget_files(conn: sqlite3.Connection, keep: Iterable[str]) -> None:
    """Drop records of files no longer in the directory (their rollouts stay)."""
    keep = list(keep)
    marks = ",".join("?" * len(keep))
    conn.execute(f"DELETE FROM rollout_files WHERE path NOT IN ({marks})", keep)
