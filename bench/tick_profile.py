"""Where a reconciler tick's time goes: every SQL statement of the slowest ticks, timed.

Runs bench/rollout_bench.py's whole scenario once on a copy of a benchmark database
with a trace callback on the writer connection; a statement's time is from its
start to the next statement's start (or the tick's end), in wall and CPU time
(time.process_time, which a loaded machine inflates less). Prints, per phase, the
slowest tick's statements, most expensive first.

    python bench/build_db.py --machines 100000 --out /tmp/fleet.db
    python bench/tick_profile.py --db /tmp/fleet.db --machines 100000 [--top 8]

Triggers' statements are reported by SQLite as comments ("-- TRIGGER name") and
charged to themselves; the trace callback itself costs a few µs per statement,
so the totals are a little above a plain run's.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import rollout_bench


class Tracer:
    """Statement start times of the current tick; a tick's profile when it ends."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, float, float]] = []
        self.on = False

    def __call__(self, sql: str) -> None:
        if self.on:
            self.marks.append((sql, time.perf_counter(), time.process_time()))

    def start(self) -> None:
        self.marks, self.on = [], True

    def stop(self) -> dict[str, list[float]]:
        self.on = False
        end = (time.perf_counter(), time.process_time())
        spent: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
        for i, (sql, wall, cpu) in enumerate(self.marks):
            nwall, ncpu = self.marks[i + 1][1:] if i + 1 < len(self.marks) else end
            key = re.sub(r"\s+", " ", sql).strip()[:150]
            spent[key][0] += nwall - wall
            spent[key][1] += ncpu - cpu
            spent[key][2] += 1
        return dict(spent)


class ProfiledClock(rollout_bench.Clock):
    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.tracer = Tracer()
        with self.store.transaction() as conn:  # the writer connection, kept by Store
            conn.set_trace_callback(self.tracer)
        self.profiles: dict[str, list[tuple[float, dict[str, list[float]]]]] = defaultdict(list)

    def tick(self, phase: str, advance: float = 2.0) -> int:
        self.tracer.start()
        n = self.ticks[phase].__len__()
        changed = super().tick(phase, advance)
        profile = self.tracer.stop()
        self.profiles[phase].append((self.ticks[phase][n], profile))
        return changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--machines", type=int, default=100_000)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    rollout_bench.Clock = ProfiledClock  # type: ignore[misc]
    clock = rollout_bench.once(args.db, args.machines)
    assert isinstance(clock, ProfiledClock)
    for phase, ticks in clock.profiles.items():
        seconds, profile = max(ticks, key=lambda t: t[0])
        cpu = clock.cpu[phase][[t[0] for t in ticks].index(seconds)]
        print(
            f"\n{phase}: slowest of {len(ticks)} ticks {seconds * 1000:.0f} ms "
            f"(CPU {cpu * 1000:.0f} ms)"
        )
        rows = sorted(profile.items(), key=lambda kv: -kv[1][1])
        for sql, (wall, pcpu, n) in rows[: args.top]:
            print(f"  {wall * 1000:7.1f} ms  cpu {pcpu * 1000:7.1f}  x{int(n):<6} {sql}")


if __name__ == "__main__":
    main()
