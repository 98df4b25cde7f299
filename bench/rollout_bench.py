"""One reconciler tick over a rollout of every machine in the fleet.

Creates a release with an entry per machine and applies an all-at-once rollout
through the real store code (releases.insert, rollouts.apply), then times
reconciler.tick on a copy of the benchmark database:

  start   the tick that starts the batch: desired generation for every machine
  wait    a tick with every machine still pending (nothing reported yet)
  settle  a tick after every agent reported the new generation, healthy
"""

from __future__ import annotations

import shutil
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fleet

from nixfleet.models import Release, ReleaseEntry, isoformat, utcnow
from nixfleet.store import Store


def run(db: Path, machines: int, runs: int) -> dict[str, Any]:
    try:
        from nixfleet import flake, reconciler
        from nixfleet.store import releases, rollouts
    except ImportError as e:
        return {"available": False, "reason": f"reconciler not importable: {e}"}
    results: dict[str, list[float]] = {"start": [], "wait": [], "settle": []}
    for _ in range(runs):
        copy = db.with_name(db.stem + "-tick.db")
        for suffix in ("-wal", "-shm"):
            Path(str(copy) + suffix).unlink(missing_ok=True)
        shutil.copyfile(db, copy)
        store = Store(copy)
        now = utcnow()
        entries = tuple(
            ReleaseEntry(fleet.hostname(i), fleet.next_generation(i), "x86_64-linux")
            for i in range(machines)
        )
        release = Release(flake.release_id(entries), entries, cache_url="https://cache.example")
        doc = {
            "version": 1,
            "name": "bench-all",
            "release": release.id,
            "target": {"tags": ["fleet"]},
            "strategy": "all-at-once",
            "health_timeout": "1h",
        }
        t0 = time.perf_counter()
        with store.transaction() as conn:
            releases.insert(conn, release, now, "bench")
            rollouts.apply(conn, doc, "bench", now, 5)
        apply_s = time.perf_counter() - t0
        for name, at in (("start", now), ("wait", now + timedelta(seconds=10))):
            t0 = time.perf_counter()
            reconciler.tick(store, 5, at)
            results[name].append(time.perf_counter() - t0)
        later = now + timedelta(seconds=20)
        with store.transaction() as conn:  # every agent reports the new generation
            conn.execute(
                "UPDATE machines SET current_generation = desired_generation, "
                "last_report_at = ?, system_state = 'ok', last_success = 1 "
                "WHERE desired_generation IS NOT NULL",
                (isoformat(later),),
            )
        t0 = time.perf_counter()
        reconciler.tick(store, 5, later + timedelta(seconds=10))
        results["settle"].append(time.perf_counter() - t0)
        store.close()
        print(
            f"  tick   apply {apply_s * 1000:.0f} ms, start {results['start'][-1] * 1000:.0f} "
            f"ms, wait {results['wait'][-1] * 1000:.0f} ms, settle "
            f"{results['settle'][-1] * 1000:.0f} ms",
            file=sys.stderr,
        )
    med = {k: sorted(v)[len(v) // 2] for k, v in results.items()}
    out: dict[str, Any] = {"available": True, "seconds": max(med.values())}
    out.update({f"{k}_s": v for k, v in med.items()})
    return out
