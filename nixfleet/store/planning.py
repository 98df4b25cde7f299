"""Planning a rollout against the fleet: which machines, in which batches.

Reads only: the machines a spec targets and their lifecycles, and the release's
store paths; nixfleet.rollout.plan decides.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from nixfleet import policy, rollout, schemas
from nixfleet.errors import FieldError, ValidationError
from nixfleet.models import Lifecycle, RolloutSpec, is_release_id
from nixfleet.store import releases


def spec_of(doc: Any, what: str = "rollout") -> RolloutSpec:
    """Validate a rollout document and turn it into a RolloutSpec."""
    schemas.validate(rollout.SCHEMA, doc, what)
    policy.validate(doc, what)
    return rollout.spec_from_document(doc)


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
    return {r["id"]: Lifecycle(r["lifecycle"]) for r in rows}


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
    return {r["id"]: Lifecycle(r["lifecycle"]) for r in rows}


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
