"""Health verdicts of a deploying batch, set-based in SQL.

The twin of the pure rollout.judge: the reconciler classifies every machine of a
batch in a few statements instead of one Python object per machine, and only
machines whose verdict or soak clock changed are written. tests/store/test_verdicts.py
holds the two to the same table of cases.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from nixfleet import rollout
from nixfleet.models import MachineHealth, isoformat, parse_time
from nixfleet.policy.reboot import RebootPolicy
from nixfleet.store import audit, webhooks
from nixfleet.store.conn import Connection, Row, is_postgresql

AUDIT_SAMPLE = 20  # machines named in an aggregated audit row


# A target's facts (the columns facts_of reads by name) plus its stored reason and batch.
FACTS_SQL = (
    "SELECT rm.machine_id, rm.store_path, rm.health, rm.healthy_since, m.last_report_at, "
    "m.current_generation, m.last_success, m.failed_generation, "
    "CASE m.health WHEN 'healthy' THEN 1 WHEN 'failing' THEN 0 END AS health_passed, "
    "m.last_message, "
    "rm.reason, rm.batch_idx, m.desired_set_at, m.needs_reboot, "
    "EXISTS (SELECT 1 FROM reboot_leases l WHERE l.machine_id = m.id) AS rebooting "
    "FROM rollout_machines rm JOIN machines m ON m.id = rm.machine_id "
)


def facts_of(row: Row) -> rollout.MachineFacts:
    success, passed = row["last_success"], row["health_passed"]
    return rollout.MachineFacts(
        machine_id=row["machine_id"],
        store_path=row["store_path"],
        health=MachineHealth(row["health"]),
        healthy_since=parse_time(row["healthy_since"]),
        last_report_at=parse_time(row["last_report_at"]),
        current_generation=row["current_generation"],
        last_success=None if success is None else bool(success),
        failed_generation=row["failed_generation"],
        health_passed=None if passed is None else bool(passed),
        last_message=row["last_message"],
        given_at=parse_time(row["desired_set_at"]),
        needs_reboot=None if row["needs_reboot"] is None else bool(row["needs_reboot"]),
        rebooting=bool(row["rebooting"]),
    )


# --- the health gate, set-based -------------------------------------------------------


# rollout.judge for every pending machine of one batch, as one SELECT; returns only
# the machines whose verdict (health or soak clock) changes. Kept equal to judge()
# by tests/store/test_verdicts.py on a table of cases, on both backends; change both
# together.
#
# The inner query classifies each machine once (S silent since the batch started,
# F agent reported failure — of this generation, or naming none —, O other
# generation, E still reporting another generation's failure, H health checks
# failing, R needs a reboot, B rebooting (holds a reboot lease), G good); its
# OFFSET keeps SQLite and PostgreSQL from flattening it into the outer one, which
# would re-evaluate the classification at every reference. A machine's start is the
# batch's, or when it was given its generation if that is later (since: a disruption
# budget held it). One text for both backends but the two spellings of `since`
# (SQLite's scalar max is PostgreSQL's greatest) and of the OFFSET (SQLite's needs a
# LIMIT, PostgreSQL's refuses -1).
def _judge_sql(since: str, offset: str) -> str:
    states = f"""
SELECT rm.machine_id, rm.position, rm.healthy_since AS since0, m.last_message AS msg,
  CASE WHEN NOT coalesce(m.last_report_at >= {since}, false) THEN 'S'
    WHEN m.failed_generation = rm.store_path
      OR (m.last_success = 0 AND m.failed_generation IS NULL) THEN 'F'
    WHEN m.current_generation IS DISTINCT FROM rm.store_path THEN 'O'
    WHEN m.last_success = 0 THEN 'E'
    WHEN m.health = 'failing' THEN 'H'
    WHEN :reboot = 1 AND EXISTS (SELECT 1 FROM reboot_leases l WHERE l.machine_id = m.id)
      THEN 'B'
    WHEN :reboot = 1 AND m.needs_reboot = 1 THEN 'R'
    ELSE 'G' END AS state,
  {since} <= :timeout_cutoff AS timed_out
FROM rollout_machines rm JOIN machines m ON m.id = rm.machine_id
WHERE rm.rollout_id = :rollout AND rm.batch_idx = :batch AND rm.health = 'pending'
  AND rm.position > :after AND rm.position <= :until
  AND ({since} <= :timeout_cutoff OR rm.healthy_since IS NOT NULL
       OR m.last_report_at >= {since})
{offset}
"""
    verdicts = f"""
SELECT machine_id, position, since0,
  CASE state WHEN 'F' THEN 'unhealthy'
    WHEN 'G' THEN
      CASE WHEN coalesce(since0, :now) <= :soaked THEN 'healthy' ELSE 'pending' END
    ELSE CASE WHEN timed_out THEN 'unhealthy' ELSE 'pending' END END AS health,
  CASE state
    WHEN 'F' THEN 'agent reported failure' || CASE WHEN msg <> '' THEN ': ' || msg ELSE '' END
    WHEN 'G' THEN 'healthy'
    WHEN 'S' THEN :timed_out_after || 'no report since the batch started)'
    WHEN 'O' THEN :timed_out_after || 'not yet running the release''s generation)'
    WHEN 'E' THEN :timed_out_after || 'still reporting the failure of another generation)'
    WHEN 'H' THEN :timed_out_after || 'health checks failing)'
    WHEN 'B' THEN :timed_out_after || 'rebooting)'
    ELSE :timed_out_after || 'needs a reboot)' END AS reason,
  CASE state WHEN 'G' THEN coalesce(since0, :now) END AS healthy_since
FROM ({states}) AS states
"""
    return f"""
SELECT machine_id, position, health, CASE WHEN health <> 'pending' THEN reason END AS reason,
  healthy_since
FROM ({verdicts}) AS verdicts WHERE health <> 'pending' OR healthy_since IS DISTINCT FROM since0
"""


JUDGE_SQL = _judge_sql("max(:started, coalesce(m.desired_set_at, :started))", "LIMIT -1 OFFSET 0")
JUDGE_SQL_PG = _judge_sql("greatest(:started, coalesce(m.desired_set_at, :started))", "OFFSET 0")


def judge_sql(conn: Connection) -> str:
    """JUDGE_SQL in the connection's dialect."""
    return JUDGE_SQL_PG if is_postgresql(conn) else JUDGE_SQL


def judge_params(
    rollout_id: str,
    batch: int,
    started: datetime,
    now: datetime,
    health_timeout: int,
    soak: int,
    window: tuple[int, int] = (-1, 2**62),
    reboot: bool = False,
) -> dict[str, str | int]:
    """JUDGE_SQL's parameters: everything judge() derives from the clock, computed once.

    `window` (after, until] limits the judged machines to those positions.
    """
    return {
        "rollout": rollout_id,
        "batch": batch,
        "after": window[0],
        "until": window[1],
        "started": isoformat(started),
        "now": isoformat(now),
        "soaked": isoformat(now - timedelta(seconds=soak)),
        "timeout_cutoff": isoformat(now - timedelta(seconds=health_timeout)),
        "reboot": int(reboot),
        "timed_out_after": f"timed out after {rollout.format_duration(health_timeout)} (",
    }


def judge_batch(
    conn: Connection,
    view: rollout.RolloutView,
    batch: rollout.BatchView,
    now: datetime,
    actor: str,
    window: tuple[int, int],
) -> tuple[int, rollout.Tally]:
    """Judge the machines at positions `window` (after, until]; return (changed, tally).

    The tally counts the whole batch. Three statements, and no Python object per
    machine: a temp table of the changed verdicts (a quiet tick finds none), an
    UPDATE from it, and a count by health. Each newly unhealthy machine gets its
    rollout event and its machine.unhealthy webhook (each by one INSERT … SELECT);
    the audit log gets one row per batch and tick.
    """
    assert batch.started_at is not None
    spec = view.spec
    pg = is_postgresql(conn)
    temp = "pg_temp" if pg else "temp"  # the connection's own table (a pooled one keeps it)
    conn.execute(
        "CREATE TEMP TABLE IF NOT EXISTS judged (machine_id TEXT NOT NULL, "
        "position INTEGER NOT NULL, health TEXT NOT NULL, reason TEXT, healthy_since TEXT)"
    )
    params = judge_params(
        view.id,
        batch.index,
        batch.started_at,
        now,
        spec.health_timeout,
        spec.soak,
        window,
        reboot=view.policy.reboot is RebootPolicy.WHEN_NEEDED,
    )
    changed = conn.execute(f"INSERT INTO {temp}.judged " + judge_sql(conn), params).rowcount
    if changed:
        at = isoformat(now)
        conn.execute(
            "UPDATE rollout_machines SET health = j.health, reason = j.reason, "
            "healthy_since = j.healthy_since, "
            "decided_at = CASE WHEN j.health = 'pending' THEN NULL ELSE ? END "
            f"FROM {temp}.judged j WHERE rollout_machines.rollout_id = ? "
            "AND rollout_machines.machine_id = j.machine_id",
            (at, view.id),
        )
        # The detail as JSON text: SQLite's json_object, PostgreSQL's json_build_object
        # (its parameters typed: "any" says nothing).
        reason, with_batch = (
            (
                "json_build_object('reason', reason)::text",
                "json_build_object('reason', reason, 'batch', CAST(? AS INTEGER))::text",
            )
            if pg
            else ("json_object('reason', reason)", "json_object('reason', reason, 'batch', ?)")
        )
        failed = conn.execute(
            "INSERT INTO rollout_events (rollout_id, at, kind, batch_idx, machine_id, "
            f"detail_json) SELECT ?, ?, 'machine-unhealthy', ?, machine_id, {reason} "
            f"FROM {temp}.judged WHERE health = 'unhealthy' ORDER BY position",
            (view.id, at, batch.index),
        ).rowcount
        if failed:
            webhooks.add_rows(
                conn,
                webhooks.MACHINE_UNHEALTHY,
                f"SELECT ? AS at, ? AS rollout_id, machine_id, {with_batch} AS detail_json "
                f"FROM {temp}.judged WHERE health = 'unhealthy' ORDER BY position",
                (at, view.id, batch.index),
            )
            sample = [
                r[0]
                for r in conn.execute(
                    f"SELECT machine_id FROM {temp}.judged WHERE health = 'unhealthy' "
                    "ORDER BY position LIMIT ?",
                    (AUDIT_SAMPLE,),
                )
            ]
            detail = {"rollout": view.id, "batch": batch.index, "count": failed}
            audit.record(
                conn,
                actor,
                "rollout.machine-unhealthy",
                view.id,
                now,
                {**detail, "machines": sample},
            )
        conn.execute(f"DELETE FROM {temp}.judged")
    # Two filtered counts in one pass over the covering index of the rows not yet
    # healthy (migration 0019; the `!= 'healthy'` term is what lets SQLite use it).
    unhealthy, waiting = conn.execute(
        "SELECT count(*) FILTER (WHERE health = ?), count(*) FILTER (WHERE health = ?) "
        "FROM rollout_machines WHERE rollout_id = ? AND batch_idx = ? AND health != 'healthy'",
        (MachineHealth.UNHEALTHY.value, MachineHealth.PENDING.value, view.id, batch.index),
    ).fetchone()
    tally = rollout.Tally(unhealthy=unhealthy, waiting=waiting)
    return changed, tally
