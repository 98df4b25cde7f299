"""The operator's control of a rollout: pause, resume (re-running failed batches), cancel.

rollout.control decides whether the transition is allowed; this writes it. On
PostgreSQL the rollout's row is read FOR NO KEY UPDATE (locked to the commit): two
operators, or an operator and a reconciler tick (store.ticks.to_visit locks the same
rows), change a rollout one after the other, each deciding on the status the other
committed, as SQLite's one writer makes them.
"""

from __future__ import annotations

from datetime import datetime

from nixfleet import rollout
from nixfleet.models import RolloutStatus, isoformat
from nixfleet.store.conn import Connection, is_postgresql
from nixfleet.store.rollouts import add_events, resolve, set_poll_hint

_STATUS = "SELECT name, status FROM rollouts WHERE id = ?"


def control(
    conn: Connection,
    ref: str,
    action: str,
    actor: str,
    now: datetime,
    poll_hint: int,
) -> str:
    """Pause, resume or cancel; resume re-runs failed batches. Returns the rollout id."""
    rid = resolve(conn, ref)
    status = _STATUS + " FOR NO KEY UPDATE" if is_postgresql(conn) else _STATUS
    row = conn.execute(status, (rid,)).fetchone()
    current = RolloutStatus(row["status"])
    target = rollout.control(row["name"], current, action)
    at = isoformat(now)
    kind = "rollout-resumed" if action == "resume" else f"rollout-{target.value}"
    events = [rollout.Event(kind, detail={"from": current.value, "to": target.value})]
    if action == "resume":
        failed = [
            r["idx"]
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
