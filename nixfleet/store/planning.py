"""Planning a rollout against the fleet: which machines, in which batches.

Reads only: the machines a spec targets and their lifecycles, and the release's
store paths; nixfleet.rollout.plan decides. `target_warnings` names the targets that
will not follow (DESIGN §3 Lifecycle: decommissioned or stale), for plan and apply.
The hosts asked for are a temp table on SQLite and an array parameter on PostgreSQL
(whose read-only snapshot, store.read(), may not create one); the rest is one spelling.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from nixfleet import policy, rollout, schemas
from nixfleet.errors import FieldError, ValidationError
from nixfleet.models import (
    Lifecycle,
    RolloutSpec,
    is_release_id,
    isoformat,
    parse_time,
    stale_cutoff,
)
from nixfleet.store import releases
from nixfleet.store.conn import Connection, Row, is_postgresql
from nixfleet.store.status import STALE_SQL


def spec_of(doc: Any, what: str = "rollout") -> RolloutSpec:
    """Validate a rollout document and turn it into a RolloutSpec."""
    schemas.validate(rollout.SCHEMA, doc, what)
    policy.validate(doc, what)
    return rollout.spec_from_document(doc)


def _tagged(conn: Connection, tags: Sequence[str]) -> dict[str, Lifecycle]:
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
    return {r["id"]: Lifecycle(r["lifecycle"]) for r in rows}


def _of_hosts(
    conn: Connection, hosts: Iterable[str], sql: str, params: Sequence[object] = ()
) -> list[Row]:
    """Rows of `sql` for these hosts: a query joining machines m with {wanted} w (w.id,
    each host once), whose own parameters come after {wanted} in its text."""
    hosts = list(hosts)
    if not hosts:
        return []
    if is_postgresql(conn):
        wanted = "(SELECT DISTINCT unnest(CAST(? AS TEXT[])) AS id)"
        return conn.execute(sql.format(wanted=wanted), (hosts, *params)).fetchall()
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS wanted_hosts (id TEXT PRIMARY KEY)")
    conn.execute("DELETE FROM wanted_hosts")
    conn.executemany("INSERT OR IGNORE INTO wanted_hosts VALUES (?)", ((h,) for h in hosts))
    rows = conn.execute(sql.format(wanted="wanted_hosts"), params).fetchall()
    conn.execute("DELETE FROM wanted_hosts")
    return rows


def _lifecycles(conn: Connection, hosts: Iterable[str]) -> dict[str, Lifecycle]:
    rows = _of_hosts(
        conn, hosts, "SELECT m.id, m.lifecycle FROM machines m JOIN {wanted} w ON w.id = m.id"
    )
    return {r["id"]: Lifecycle(r["lifecycle"]) for r in rows}


@dataclass(frozen=True)
class TargetWarning:
    """A target that will not follow the rollout as it stands (DESIGN §3 Lifecycle)."""

    hostname: str
    kind: str  # "decommissioned" (its reports are refused) or "stale" (models.is_stale)
    last_report_at: datetime | None


def target_warnings(
    conn: Connection, hosts: Iterable[str], now: datetime, stale_after: int
) -> list[TargetWarning]:
    """The targets among `hosts` that are decommissioned or stale, by hostname."""
    rows = _of_hosts(
        conn,
        hosts,
        "SELECT m.id, m.lifecycle, m.last_report_at FROM machines m "
        "JOIN {wanted} w ON w.id = m.id "
        f"WHERE m.lifecycle = 'decommissioned' OR {STALE_SQL} ORDER BY m.id",
        (isoformat(stale_cutoff(now, stale_after)),),
    )
    return [
        TargetWarning(
            r["id"],
            "decommissioned" if r["lifecycle"] == Lifecycle.DECOMMISSIONED.value else "stale",
            parse_time(r["last_report_at"]),
        )
        for r in rows
    ]


def make_plan(conn: Connection, spec: RolloutSpec) -> tuple[rollout.Plan, dict[str, str]]:
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
