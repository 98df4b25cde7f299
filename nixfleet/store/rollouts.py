"""Rollouts in the database: apply a document, events, and reading them back.

Deciding is nixfleet.rollout's job; this module reads the facts it needs and
writes what was decided, set-based (one statement per batch, never one per
machine in a loop), inside the caller's transaction. Reads return dataclasses;
the API renders them. Planning is store.planning, the operator's pause, resume and
cancel store.rollout_control, GitOps file records store.rollout_files, and what a
reconciler tick writes store.ticks.

On PostgreSQL, where writers do not wait for each other as on SQLite, `apply` takes
the advisory lock locks.ROLLOUT_APPLY first (to the commit): its checks (the same document
again, an active rollout of the name, targets owned by an active rollout) read what
a concurrent apply would write. Rollouts that share a creation time (one GitOps
pass, or tests on a fixed clock) are ordered by their rollout-created event's id,
the order they were applied in, on both backends (SQLite's implicit rowid has no
PostgreSQL twin).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from nixfleet import policy, rollout
from nixfleet.errors import ConflictError, FieldError, NotFoundError, ValidationError
from nixfleet.models import (
    BatchStatus,
    MachineHealth,
    RolloutStatus,
    isoformat,
    parse_time,
    time_of,
)
from nixfleet.policy.reboot import RebootPolicy
from nixfleet.store import audit, locks, webhooks
from nixfleet.store.conn import Connection, Row, is_postgresql
from nixfleet.store.planning import make_plan, spec_of
from nixfleet.store.verdicts import FACTS_SQL, facts_of
from nixfleet.wire import JSONObject, RolloutDocument


def source_label(name: str) -> str:
    """What machines.desired_source says for generations a rollout set."""
    return f"rollout:{name}"


# --- apply --------------------------------------------------------------------------


@dataclass(frozen=True)
class Applied:
    id: str
    created: bool


# The order rollouts were applied in: apply writes the rollout-created event last
# (rollout_events are never deleted), one index probe per rollout.
_APPLIED = "(SELECT min(e.id) FROM rollout_events e WHERE e.rollout_id = r.id)"


def _overlaps(conn: Connection, targets: Sequence[str]) -> dict[str, str]:
    if is_postgresql(conn):  # an array, not a temp table
        rows = conn.execute(
            "SELECT rm.machine_id, r.name FROM rollout_machines rm "
            "JOIN rollouts r ON r.id = rm.rollout_id WHERE r.status IN ('running', 'paused') "
            "AND rm.machine_id = ANY(CAST(? AS TEXT[]))",
            (list(targets),),
        ).fetchall()
        return {r["machine_id"]: r["name"] for r in rows}
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS new_targets (id TEXT PRIMARY KEY)")
    conn.execute("DELETE FROM new_targets")
    conn.executemany("INSERT OR IGNORE INTO new_targets VALUES (?)", ((t,) for t in targets))
    rows = conn.execute(
        "SELECT rm.machine_id, r.name FROM rollout_machines rm "
        "JOIN new_targets n ON n.id = rm.machine_id "
        "JOIN rollouts r ON r.id = rm.rollout_id WHERE r.status IN ('running', 'paused')"
    ).fetchall()
    conn.execute("DELETE FROM new_targets")
    return {r["machine_id"]: r["name"] for r in rows}


def _latest_by_name(conn: Connection, name: str) -> tuple[str, RolloutStatus] | None:
    row = conn.execute(
        "SELECT r.id, r.status FROM rollouts r WHERE r.name = ? "
        f"ORDER BY r.created_at DESC, {_APPLIED} DESC LIMIT 1",
        (name,),
    ).fetchone()
    return None if row is None else (row["id"], RolloutStatus(row["status"]))


def apply(
    conn: Connection,
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
    pg = is_postgresql(conn)
    if pg:  # before the first check: concurrent applies run one after the other
        conn.execute("SELECT pg_advisory_xact_lock(?)", (locks.ROLLOUT_APPLY,))
        # The release stays as make_plan reads it (retention prunes it FOR UPDATE).
        conn.execute("SELECT 1 FROM releases WHERE id = ? FOR SHARE", (spec.release,))
    if conn.execute("SELECT 1 FROM rollouts WHERE id = ?", (rid,)).fetchone():
        return Applied(rid, created=False)
    latest = _latest_by_name(conn, spec.name)
    if latest is not None and latest[1].active:
        raise ConflictError(
            f"rollout {spec.name!r} is {latest[1]} with a different document; "
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
    # first start re-copies only what changed since (store.ticks.write_desired).
    targets = [(i, h) for i, b in enumerate(p.batches) for h in b]
    if pg:  # one statement over arrays, not a round trip per target
        conn.execute(
            "INSERT INTO rollout_machines (rollout_id, machine_id, batch_idx, position, "
            "store_path, prev_generation, prev_cache_url, prev_source) SELECT ?, m.id, "
            "t.batch_idx, t.n - 1, t.store_path, m.desired_generation, m.desired_cache_url, "
            "m.desired_source FROM unnest(CAST(? AS TEXT[]), CAST(? AS INTEGER[]), "
            "CAST(? AS TEXT[])) WITH ORDINALITY AS t(host, batch_idx, store_path, n) "
            "JOIN machines m ON m.id = t.host",
            (
                rid,
                [h for _, h in targets],
                [i for i, _ in targets],
                [paths[h] for _, h in targets],
            ),
        )
        # The first ticks come within seconds, before autovacuum's analyze: without
        # statistics of the new rollout id the planner took it for one row and ran the
        # batch start's per-machine look-up as a scan of the whole rollout (a 2,500-
        # machine start at 100,000 machines: 129 s instead of under 1 s; bench/pg_bench.py).
        conn.execute("ANALYZE rollout_machines")
    else:
        conn.executemany(
            "INSERT INTO rollout_machines (rollout_id, machine_id, batch_idx, position, "
            "store_path, prev_generation, prev_cache_url, prev_source) SELECT ?, id, ?, ?, ?, "
            "desired_generation, desired_cache_url, desired_source FROM machines WHERE id = ?",
            ((rid, i, pos, paths[host], host) for pos, (i, host) in enumerate(targets)),
        )
    set_poll_hint(conn, rid, poll_hint)
    if spec.confirm_timeout is not None:  # one row: the report path reads it (confirm window)
        conn.execute(
            "UPDATE rollouts SET confirm_timeout = ? WHERE id = ?", (spec.confirm_timeout, rid)
        )
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


def set_poll_hint(conn: Connection, rollout_id: str, hint: int | None) -> None:
    """Short polls while a rollout runs; NULL (the agent's own interval) otherwise.

    One row: the report path reads the hint of the running rollout a machine is in
    (machines.record_report), so no machine row is written here.
    """
    conn.execute("UPDATE rollouts SET poll_hint = ? WHERE id = ?", (hint, rollout_id))


def add_events(
    conn: Connection,
    rollout_id: str,
    now: datetime,
    events: Sequence[rollout.Event],
    actor: str,
) -> None:
    """Each state change: a rollout_events row, an audit row and, for the kinds that
    are webhook events (store.webhooks.ROLLOUT_EVENTS), an outbox row."""
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
        detail: JSONObject = {**e.detail, "rollout": rollout_id}
        if e.batch is not None:
            detail["batch"] = e.batch
        if e.machine_id is not None:
            detail["machine"] = e.machine_id
        audit.record(conn, actor, f"rollout.{e.kind}", rollout_id, now, detail)
        hook = webhooks.ROLLOUT_EVENTS.get(e.kind)
        if hook is not None:
            body = dict(e.detail) if e.batch is None else {**e.detail, "batch": e.batch}
            webhooks.add(
                conn, hook, now, machine_id=e.machine_id, rollout_id=rollout_id, detail=body
            )


# --- reading ------------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutSummary:
    id: str
    name: str
    release: str
    status: RolloutStatus
    source: str
    created_at: datetime
    created_by: str
    updated_at: datetime
    machines: Mapping[MachineHealth, int]  # targets by health
    # store.retention: when it was condensed (the counts are its batches', and only its
    # machines that ended unhealthy are listed)
    machines_pruned_at: datetime | None = None


@dataclass(frozen=True)
class MachineProgress:
    """One target of a rollout: its verdict (or why it is still pending)."""

    id: str
    health: MachineHealth
    reason: str
    store_path: str
    current_generation: str | None
    last_report_at: datetime | None
    # The tail of the failed switch's output (issue 19): for the first OUTPUT_MACHINES
    # unhealthy machines whose failure is this rollout's generation; else None.
    failed_output: str | None = None


# `rollout status` shows why a switch failed without ssh: the output tail of this many
# unhealthy machines, this many characters each (all of it: `nixfleet machines show`).
OUTPUT_MACHINES = 20
OUTPUT_TAIL = 4096


@dataclass(frozen=True)
class BatchDetail:
    index: int
    status: BatchStatus
    size: int
    started_at: datetime | None
    finished_at: datetime | None
    machines: tuple[MachineProgress, ...]
    # A condensed rollout's batch (store.retention): its health counts; `machines` holds
    # only those that ended unhealthy.
    counts: Mapping[MachineHealth, int] | None = None


@dataclass(frozen=True)
class RolloutEvent:
    at: datetime
    kind: str
    batch: int | None
    machine: str | None
    detail: JSONObject


@dataclass(frozen=True)
class RolloutDetail:
    """Everything `rollout status` shows."""

    summary: RolloutSummary
    document: RolloutDocument  # as applied
    skipped: tuple[rollout.Skip, ...]
    batches: tuple[BatchDetail, ...]
    events: tuple[RolloutEvent, ...]  # the latest 200, oldest first
    # DESIGN §11: what holds it back (waiting-for-window, held-by-budget) and why.
    hold: tuple[str, str] | None = None


def resolve(conn: Connection, ref: str) -> str:
    """A rollout id from an id or a name (the newest rollout of that name)."""
    row = conn.execute("SELECT id FROM rollouts WHERE id = ?", (ref,)).fetchone()
    if row is not None:
        return str(row["id"])
    latest = _latest_by_name(conn, ref)
    if latest is None:
        raise NotFoundError(f"no rollout {ref!r}; see `nixfleet rollout list`")
    return latest[0]


def _counts(conn: Connection, rollout_id: str | None) -> dict[str, dict[MachineHealth, int]]:
    where, params = ("WHERE rollout_id = ?", [rollout_id]) if rollout_id else ("", [])
    counts: dict[str, dict[MachineHealth, int]] = {}
    for r in conn.execute(
        f"SELECT rollout_id, health, COUNT(*) AS n FROM rollout_machines {where} "
        "GROUP BY rollout_id, health",
        params,
    ):
        counts.setdefault(r["rollout_id"], {h: 0 for h in MachineHealth})[
            MachineHealth(r["health"])
        ] = r["n"]
    # Condensed rollouts (store.retention): their batches' counts, whatever rows remain.
    where = "WHERE r.machines_pruned_at IS NOT NULL" + (" AND r.id = ?" if rollout_id else "")
    for r in conn.execute(
        "SELECT b.rollout_id, SUM(b.healthy) AS healthy, SUM(b.unhealthy) AS unhealthy, "
        "SUM(b.pending) AS pending FROM rollout_batches b "
        f"JOIN rollouts r ON r.id = b.rollout_id {where} GROUP BY b.rollout_id",
        params,
    ):
        counts[r["rollout_id"]] = {h: r[h.value] or 0 for h in MachineHealth}
    return counts


def _summary(r: Row, counts: Mapping[MachineHealth, int] | None) -> RolloutSummary:
    return RolloutSummary(
        id=r["id"],
        name=r["name"],
        release=r["release_id"],
        status=RolloutStatus(r["status"]),
        source=r["source"],
        created_at=time_of(r["created_at"]),
        created_by=r["created_by"],
        updated_at=time_of(r["updated_at"]),
        machines=counts if counts is not None else {h: 0 for h in MachineHealth},
        machines_pruned_at=parse_time(r["machines_pruned_at"]),
    )


def list_rollouts(conn: Connection, status: str | None = None) -> list[RolloutSummary]:
    """Rollouts newest first, with per-rollout machine counts."""
    where, params = ("WHERE r.status = ?", [status]) if status else ("", [])
    rows = conn.execute(
        f"SELECT r.* FROM rollouts r {where} ORDER BY r.created_at DESC, {_APPLIED} DESC", params
    ).fetchall()
    counts = _counts(conn, None)
    return [_summary(r, counts.get(r["id"])) for r in rows]


def load_view(conn: Connection, rollout_id: str) -> rollout.RolloutView:
    row = conn.execute(
        "SELECT id, name, status, document_json FROM rollouts WHERE id = ?", (rollout_id,)
    ).fetchone()
    if row is None:
        raise NotFoundError(f"no rollout {rollout_id!r}; see `nixfleet rollout list`")
    batches = tuple(
        rollout.BatchView(
            b["idx"], BatchStatus(b["status"]), b["size"], parse_time(b["started_at"])
        )
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


def detail(conn: Connection, rollout_id: str, now: datetime) -> RolloutDetail:
    """Batches, per-machine health with reasons (judged as of `now`), and events."""
    row = conn.execute("SELECT * FROM rollouts WHERE id = ?", (rollout_id,)).fetchone()
    if row is None:
        raise NotFoundError(f"no rollout {rollout_id!r}; see `nixfleet rollout list`")
    view = load_view(conn, rollout_id)
    spec = view.spec
    rebooting = view.policy.reboot is RebootPolicy.WHEN_NEEDED
    # store.retention: a condensed rollout lists only the machines that ended unhealthy
    condensed = row["machines_pruned_at"] is not None
    # The last OUTPUT_TAIL characters: SQLite's substr counts a negative start from the
    # end, PostgreSQL's does not (its right() does).
    tail = "right(m.failed_output, ?)" if is_postgresql(conn) else "substr(m.failed_output, -?)"
    outputs = dict(
        conn.execute(
            f"SELECT rm.machine_id, {tail} FROM rollout_machines rm "
            "JOIN machines m ON m.id = rm.machine_id WHERE rm.rollout_id = ? "
            "AND rm.health = 'unhealthy' AND m.failed_generation = rm.store_path "
            "AND m.failed_output IS NOT NULL ORDER BY rm.position LIMIT ?",
            (OUTPUT_TAIL, rollout_id, OUTPUT_MACHINES),
        ).fetchall()
    )
    machines: dict[int, list[MachineProgress]] = {}
    only = " AND rm.health = 'unhealthy'" if condensed else ""
    rows = conn.execute(
        FACTS_SQL + f"WHERE rm.rollout_id = ?{only} ORDER BY rm.position", (rollout_id,)
    )
    for r in rows:
        f = facts_of(r)
        batch = view.batches[r["batch_idx"]]
        reason = r["reason"] or ""
        if f.health is MachineHealth.PENDING:
            if batch.status is BatchStatus.DEPLOYING and batch.started_at is not None:
                reason = rollout.judge(
                    f, batch.started_at, now, spec.health_timeout, spec.soak, rebooting
                ).reason
            else:
                reason = f"batch {batch.status}"
        machines.setdefault(batch.index, []).append(
            MachineProgress(
                f.machine_id,
                f.health,
                reason,
                f.store_path,
                f.current_generation,
                f.last_report_at,
                outputs.get(f.machine_id),
            )
        )
    finished = {}
    kept: dict[int, dict[MachineHealth, int]] = {}
    for b in conn.execute(
        "SELECT idx, finished_at, healthy, unhealthy, pending FROM rollout_batches "
        "WHERE rollout_id = ?",
        (rollout_id,),
    ):
        finished[b["idx"]] = parse_time(b["finished_at"])
        kept[b["idx"]] = {h: b[h.value] or 0 for h in MachineHealth}
    batches = tuple(
        BatchDetail(
            b.index,
            b.status,
            b.size,
            b.started_at,
            finished[b.index],
            tuple(machines.get(b.index, ())),
            kept[b.index] if condensed else None,
        )
        for b in view.batches
    )
    events = [
        RolloutEvent(
            time_of(e["at"]),
            e["kind"],
            e["batch_idx"],
            e["machine_id"],
            json.loads(e["detail_json"]),
        )
        for e in conn.execute(
            "SELECT at, kind, batch_idx, machine_id, detail_json FROM rollout_events "
            "WHERE rollout_id = ? ORDER BY id DESC LIMIT 200",
            (rollout_id,),
        )
    ][::-1]
    skipped = tuple(
        rollout.Skip(s["hostname"], s["reason"]) for s in json.loads(row["skipped_json"])
    )
    return RolloutDetail(
        _summary(row, _counts(conn, rollout_id).get(rollout_id)),
        json.loads(row["document_json"]),
        skipped,
        batches,
        tuple(events),
        None if row["hold"] is None else (row["hold"], row["hold_detail"] or ""),
    )
