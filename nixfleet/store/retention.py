"""Retention of deployments (issue 16, storage): finished rollouts and unused releases.

What a deployment leaves behind grows with the fleet every time: a rollout writes one
`rollout_machines` row per target, a release one `release_entries` row per host
(about 46 and 20 MiB at 100,000 machines). In the background job
(nixfleet.controlplane.retention), in short transactions:

- a **finished** rollout (completed, failed, cancelled) last changed more than
  `rollout_detail_hours` ago is *condensed*: each batch keeps its health counts
  (`healthy`, `unhealthy`, `pending` columns), the rollout its row, document, skipped
  hosts and events, the audit log its rows; `machines_pruned_at` is set, and its
  `rollout_machines` rows are deleted a chunk per transaction — all but those of the
  machines that ended unhealthy, which go once its last change is older than
  `rollout_retention_days`. Reads of a condensed rollout take the counts from its
  batches and list only its unhealthy machines, even while the other rows are still
  being deleted. What each machine went through stays in the machines' history
  (desired, switch, failure events name the rollout) for `history_days`.
- a **release** is *pruned* when no running or paused rollout uses it and no rollout
  of it changed in the last `release_retention_days` (one that was never rolled out:
  created more than `rollout_retention_days` ago), and it is not the newest release
  that holds the generation some machine desires or runs (so the release a machine
  would be rolled back to stays; an older one holding the same path does not count).
  Its header stays (id, flake, creator, time: rollouts and the audit log name it;
  `pruned_at` set) and its entries are deleted, a chunk per transaction. Registering
  the same release again (its TOML file next to the flake: the same entries give the
  same id) restores them (store.releases.insert); `rollout apply` of a file naming
  that TOML file does so itself.

The freed pages are reused by the next deployment's rows, so the file holds what the
fleet's history needs plus about one running rollout and the releases in use.

Plain SQL, no SQLite-only syntax: the PostgreSQL store runs the same statements. Where
a step decides on what it read, it locks on PostgreSQL (FOR UPDATE, PG_LOCK) the row
that decision rests on: the rollout it condenses, the release it prunes or deletes
entries of (a rollout of it being applied, or its TOML registered again, waits or is
waited for).
"""

from __future__ import annotations

from datetime import datetime

from nixfleet.models import MachineHealth, isoformat
from nixfleet.store.conn import Connection, is_postgresql

FINISHED = ("completed", "failed", "cancelled")
PG_LOCK = " FOR UPDATE"  # what the PostgreSQL spelling of a deciding read adds


def _lock(conn: Connection) -> str:
    return PG_LOCK if is_postgresql(conn) else ""


def finished_rollouts(conn: Connection, cutoff: datetime) -> list[str]:
    """Finished rollouts last changed before `cutoff` that are not condensed yet."""
    rows = conn.execute(
        "SELECT id FROM rollouts WHERE status IN (?, ?, ?) AND machines_pruned_at IS NULL "
        "AND updated_at < ? ORDER BY updated_at, id",
        (*FINISHED, isoformat(cutoff)),
    )
    return [r[0] for r in rows]


def condense_rollout(conn: Connection, rollout_id: str, now: datetime) -> bool:
    """Keep each batch's health counts and mark the rollout's machines for deletion.

    False (nothing written) when it is not a finished, uncondensed rollout any more.
    """
    row = conn.execute(
        "SELECT status, machines_pruned_at FROM rollouts WHERE id = ?" + _lock(conn),
        (rollout_id,),
    ).fetchone()
    if row is None or row[0] not in FINISHED or row[1] is not None:
        return False
    counts: dict[int, dict[str, int]] = {}
    for idx, health, n in conn.execute(
        "SELECT batch_idx, health, COUNT(*) FROM rollout_machines WHERE rollout_id = ? "
        "GROUP BY batch_idx, health",
        (rollout_id,),
    ):
        counts.setdefault(idx, {})[health] = n
    conn.execute(
        "UPDATE rollout_batches SET healthy = 0, unhealthy = 0, pending = 0 WHERE rollout_id = ?",
        (rollout_id,),
    )
    conn.executemany(
        "UPDATE rollout_batches SET healthy = ?, unhealthy = ?, pending = ? "
        "WHERE rollout_id = ? AND idx = ?",
        [
            (
                c.get(MachineHealth.HEALTHY.value, 0),
                c.get(MachineHealth.UNHEALTHY.value, 0),
                c.get(MachineHealth.PENDING.value, 0),
                rollout_id,
                idx,
            )
            for idx, c in counts.items()
        ],
    )
    conn.execute(
        "UPDATE rollouts SET machines_pruned_at = ? WHERE id = ?", (isoformat(now), rollout_id)
    )
    return True


# The rows of a condensed rollout that may go: those of machines that did not end
# unhealthy, and all of them once the rollout's last change is before :cutoff.
_GOING = "(rm.health <> 'unhealthy' OR r.updated_at < :cutoff)"


def delete_rollout_machines(conn: Connection, chunk: int, cutoff: datetime) -> int:
    """Up to `chunk` per-machine rows of condensed rollouts (`cutoff`: the
    rollout_retention_days one); how many went (0: none left)."""
    params = {"cutoff": isoformat(cutoff), "chunk": chunk}
    row = conn.execute(
        "SELECT r.id FROM rollouts r WHERE r.machines_pruned_at IS NOT NULL AND EXISTS "
        f"(SELECT 1 FROM rollout_machines rm WHERE rm.rollout_id = r.id AND {_GOING}) "
        "ORDER BY r.machines_pruned_at, r.id LIMIT 1",
        params,
    ).fetchone()
    if row is None:
        return 0
    cur = conn.execute(
        "DELETE FROM rollout_machines WHERE rollout_id = :id AND machine_id IN "
        "(SELECT rm.machine_id FROM rollout_machines rm JOIN rollouts r ON r.id = rm.rollout_id "
        f"WHERE rm.rollout_id = :id AND {_GOING} ORDER BY rm.machine_id LIMIT :chunk)",
        {**params, "id": row[0]},
    )
    return int(cur.rowcount)


def release_candidates(conn: Connection, cutoff: datetime, deployed_cutoff: datetime) -> list[str]:
    """Unpruned releases that no active rollout uses and no rollout changed since
    `deployed_cutoff`, and that were rolled out or created before `cutoff`, oldest
    first (whether a machine still needs one is `in_use`)."""
    rows = conn.execute(
        "SELECT r.id FROM releases r WHERE r.pruned_at IS NULL AND r.created_at < :deployed "
        "AND NOT EXISTS (SELECT 1 FROM rollouts o WHERE o.release_id = r.id "
        "AND (o.status IN ('running', 'paused') OR o.updated_at >= :deployed)) "
        "AND (r.created_at < :cutoff OR EXISTS (SELECT 1 FROM rollouts o "
        "WHERE o.release_id = r.id)) ORDER BY r.created_at, r.id",
        {"cutoff": isoformat(cutoff), "deployed": isoformat(deployed_cutoff)},
    )
    return [r[0] for r in rows]


# Some machine desires or runs this release's generation for it, and no newer
# unpruned release holds that same generation for that host. (The few releases drive
# the inner loop, each a key look-up of its entry for the host: CROSS JOIN keeps
# SQLite from scanning release_entries instead; PostgreSQL reads it as a plain join.)
_IN_USE = """
SELECT 1 FROM release_entries e JOIN machines m ON m.id = e.hostname
WHERE e.release_id = :id
    AND (m.desired_generation = e.store_path OR m.current_generation = e.store_path)
    AND NOT EXISTS (
        SELECT 1 FROM releases n CROSS JOIN release_entries ne
        WHERE ne.release_id = n.id AND ne.hostname = m.id AND ne.store_path = e.store_path
            AND n.pruned_at IS NULL AND n.id <> :id
            AND (n.created_at > :created OR (n.created_at = :created AND n.id > :id)))
LIMIT 1
"""


def in_use(conn: Connection, release_id: str) -> bool:
    row = conn.execute("SELECT created_at FROM releases WHERE id = ?", (release_id,)).fetchone()
    if row is None:
        return False
    found = conn.execute(_IN_USE, {"id": release_id, "created": row[0]}).fetchone()
    return found is not None


def prune_release(
    conn: Connection,
    release_id: str,
    cutoff: datetime,
    deployed_cutoff: datetime,
    now: datetime,
) -> bool:
    """Mark one release pruned when it still qualifies (checked again in this
    transaction); its entries go afterwards (`delete_release_entries`)."""
    if is_postgresql(conn):  # first: what follows reads after the lock
        conn.execute("SELECT 1 FROM releases WHERE id = ? FOR UPDATE", (release_id,))
    candidates = release_candidates(conn, cutoff, deployed_cutoff)
    if release_id not in candidates or in_use(conn, release_id):
        return False
    conn.execute(
        "UPDATE releases SET pruned_at = ? WHERE id = ? AND pruned_at IS NULL",
        (isoformat(now), release_id),
    )
    return True


def delete_release_entries(conn: Connection, chunk: int) -> int:
    """Up to `chunk` entries of pruned releases; how many went (0: none left)."""
    row = conn.execute(
        "SELECT r.id FROM releases r WHERE r.pruned_at IS NOT NULL AND EXISTS "
        "(SELECT 1 FROM release_entries e WHERE e.release_id = r.id) "
        "ORDER BY r.pruned_at, r.id LIMIT 1" + _lock(conn)
    ).fetchone()
    if row is None:
        return 0
    cur = conn.execute(
        "DELETE FROM release_entries WHERE release_id = ? AND hostname IN "
        "(SELECT hostname FROM release_entries WHERE release_id = ? "
        "ORDER BY hostname LIMIT ?)",
        (row[0], row[0], chunk),
    )
    return int(cur.rowcount)
