"""Every reconciler tick of a rollout over the whole fleet, timed one by one.

Creates a release with an entry per machine and applies an all-at-once rollout
through the real store code (releases.insert, rollouts.apply) on a copy of the
benchmark database, then times reconciler.tick through a rollout's whole life:

  start     the ticks that write the batch's desired generations (a chunk each)
  quiet     a tick with every machine still deploying (nothing reported yet)
  judge     the ticks after every agent reported the new generation, healthy
            (soak clocks start)
  soaking   a tick while every machine soaks
  complete  the ticks after the soak: verdicts, batch and rollout completed
  revert    a second rollout (on_failure: revert) whose agents all report failure:
            the ticks that fail the batch and restore every machine's desired
  policy    a third rollout with DESIGN §11 policy active: max_unavailable 10 %, a
            maintenance window (open), a fleet-wide disruption budget over a third
            of the fleet (region-eu, 5,000 in flight) and 1 % of the fleet stale;
            machines start as the budgets free, agents report healthy between
            ticks: every tick until the rollout completes

The figure of each phase is its slowest tick, in wall time and in CPU time of this
process (time.process_time: on a shared, loaded machine the wall time includes
waiting for a core, the CPU time much less); the PASSIVE checkpoint the control
plane runs after each tick (controlplane.background) is timed separately.
bench/tick_profile.py runs the same scenario and times each statement of the
slowest tick of every phase.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fleet

from nixfleet import flake, reconciler
from nixfleet.models import Release, ReleaseEntry, isoformat, utcnow
from nixfleet.policy import fleet as fleet_policy
from nixfleet.store import Store, releases, rollouts
from nixfleet.store.conn import AnyStore

PHASES = ("start", "quiet", "judge", "soaking", "complete", "revert", "policy")
# The §11 settings of the policy phase (the fleet budget) and its rollout's fields.
POLICY = fleet_policy.from_settings(
    disruption_budgets=[{"tags": ["region-eu"], "max_in_flight": 5000}]
)
POLICY_DOC = {
    "max_unavailable": "10%",
    "windows": [{"start": "00:00", "end": "24:00", "timezone": "Europe/Berlin"}],
}


def _fresh(db: Path) -> Store:
    copy = db.with_name(db.stem + "-tick.db")
    for suffix in ("", "-wal", "-shm"):
        Path(str(copy) + suffix).unlink(missing_ok=True)
    shutil.copyfile(db, copy)
    return Store(copy)


class Clock:
    """Ticks at explicit times, each timed, with the background checkpoint after it."""

    def __init__(self, store: AnyStore, start: datetime) -> None:
        self.store, self.now = store, start
        self.ticks: dict[str, list[float]] = {p: [] for p in PHASES}
        self.cpu: dict[str, list[float]] = {p: [] for p in PHASES}  # time.process_time
        self.checkpoints: list[float] = []

    def tick(self, phase: str, advance: float = 2.0) -> int:
        self.now += timedelta(seconds=advance)
        policy = reconciler.PolicyTick(POLICY if phase == "policy" else fleet_policy.FleetPolicy())
        t0, c0 = time.perf_counter(), time.process_time()
        changed = reconciler.tick(self.store, 5, self.now, policy=policy)
        self.ticks[phase].append(time.perf_counter() - t0)
        self.cpu[phase].append(time.process_time() - c0)
        t0 = time.perf_counter()
        self.checkpoint()
        self.checkpoints.append(time.perf_counter() - t0)
        return changed

    def checkpoint(self) -> None:
        """SQLite's background WAL checkpoint (PostgreSQL has none of its own to run)."""
        if isinstance(self.store, Store):
            self.store.checkpoint()

    def until_quiet(self, phase: str) -> None:
        while self.tick(phase):
            pass

    def all_report(self, ok: bool, quiet: str = "false") -> None:
        """Every machine with a desired generation reports (but those `quiet` selects)."""
        self.now += timedelta(seconds=1)
        with self.store.transaction() as conn:
            conn.execute(
                "UPDATE machines SET current_generation = CASE WHEN ? THEN desired_generation "
                "ELSE current_generation END, last_report_at = ?, system_state = 'ok', "
                f"last_success = ? WHERE desired_generation IS NOT NULL AND NOT ({quiet})",
                (ok, isoformat(self.now), int(ok)),
            )
        self.checkpoint()


def _rollout(store: AnyStore, machines: int, name: str, salt: str, **kw: Any) -> None:
    entries = tuple(
        ReleaseEntry(fleet.hostname(i), fleet.next_generation(i, salt), "x86_64-linux")
        for i in range(machines)
    )
    release = Release(flake.release_id(entries), entries, cache_url="https://cache.example")
    doc = {
        "version": 1,
        "name": name,
        "release": release.id,
        "target": {"tags": ["fleet"]},
        "strategy": "all-at-once",
        "health_timeout": "1h",
        **kw,
    }
    with store.transaction() as conn:
        releases.insert(conn, release, utcnow(), "bench")
        rollouts.apply(conn, doc, "bench", utcnow(), 5)


def once(db: Path, machines: int, fresh: Callable[[Path], AnyStore] | None = None) -> Clock:
    """One rollout's life on a fresh copy of `db` (`fresh`: a copy in another store)."""
    store = (fresh or _fresh)(db)
    clock = Clock(store, utcnow())
    _rollout(store, machines, "bench-all", "n", soak="5m")
    clock.until_quiet("start")
    clock.tick("quiet")
    clock.all_report(ok=True)
    clock.until_quiet("judge")
    clock.tick("soaking")
    clock.now += timedelta(minutes=5)
    clock.until_quiet("complete")
    _rollout(store, machines, "bench-revert", "r", on_failure="revert")
    clock.until_quiet("start")
    clock.all_report(ok=False)
    clock.until_quiet("revert")
    # §11: the machines that reported last are the fresh ones; 1 % went quiet (stale).
    clock.all_report(ok=True)
    with store.transaction() as conn:
        conn.execute(
            "UPDATE machines SET last_report_at = ? WHERE substr(id, 6, 2) = '00'",
            (isoformat(clock.now - timedelta(hours=1)),),
        )
    _rollout(store, machines, "bench-policy", "p", **POLICY_DOC)
    # A held batch's tick may change nothing while its judge window moves on (the
    # machines it judges were judged before): quiet means a whole round of windows
    # without a change. Under a budget a window is LIMITED_SHARE of TICK_MACHINES.
    window = reconciler.limited_share(reconciler.TICK_MACHINES)
    rounds, idle = -(-machines // window) + 1, 0
    while idle < rounds:
        idle = 0 if clock.tick("policy") else idle + 1
        clock.all_report(ok=True, quiet="substr(id, 6, 2) = '00'")
        if len(clock.ticks["policy"]) > 400:
            raise RuntimeError("the policy rollout does not complete")
    with store.transaction() as conn:
        waiting = conn.execute(
            "SELECT count(*) FILTER (WHERE rm.health = 'healthy'), count(*) FILTER (WHERE "
            "rm.health = 'pending' AND substr(rm.machine_id, 6, 2) = '00'), count(*) "
            "FROM rollout_machines rm JOIN rollouts r ON r.id = rm.rollout_id "
            "WHERE r.name = 'bench-policy'"
        ).fetchone()
    healthy, stale, total = waiting
    if healthy + stale != total or len(clock.ticks["policy"]) < 10:
        # Quiet means every fresh machine started and is healthy; the stale 1 % stay
        # pending until their health timeout. Anything else (e.g. held by its window)
        # would have measured nothing.
        raise RuntimeError(
            f"the policy rollout stopped after {len(clock.ticks['policy'])} ticks with "
            f"{healthy} healthy and {stale} stale pending of {total} machines"
        )
    store.close()
    return clock


def run(
    db: Path, machines: int, runs: int, fresh: Callable[[Path], AnyStore] | None = None
) -> dict[str, Any]:
    worst: dict[str, list[float]] = {p: [] for p in PHASES}
    worst_cpu: dict[str, list[float]] = {p: [] for p in PHASES}
    counts: dict[str, int] = {}
    checkpoints: list[float] = []
    for _ in range(runs):
        clock = once(db, machines, fresh)
        for phase, times in clock.ticks.items():
            worst[phase].append(max(times))
            worst_cpu[phase].append(max(clock.cpu[phase]))
            counts[phase] = len(times)
        checkpoints.append(max(clock.checkpoints))
        print(
            "  tick   "
            + ", ".join(
                f"{p} {max(t) * 1000:.0f} ms (CPU {max(clock.cpu[p]) * 1000:.0f}, {len(t)} ticks)"
                for p, t in clock.ticks.items()
            )
            + f"; checkpoint up to {max(clock.checkpoints) * 1000:.0f} ms",
            file=sys.stderr,
        )
    med = {p: statistics.median(v) for p, v in worst.items()}
    out: dict[str, Any] = {"available": True, "seconds": max(med.values())}
    out.update({f"{p}_s": v for p, v in med.items()})
    out.update({f"{p}_cpu_s": statistics.median(v) for p, v in worst_cpu.items()})
    out.update({f"{p}_ticks": n for p, n in counts.items()})
    out["checkpoint_s"] = statistics.median(checkpoints)
    out["limit"] = reconciler.TICK_MACHINES
    return out
