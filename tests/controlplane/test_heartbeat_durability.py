"""kill -9 while agents report and operators write (bench/heartbeat_durability.py,
CI-sized): nothing acknowledged is lost, last-seen at most 1 s behind.

The full runs (`--kills 25`, 1 and 2 workers) are in docs/performance.md.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
from conftest import ROOT, load_file


def _harness() -> ModuleType:
    return load_file(
        "nixfleet_bench_heartbeat_durability", ROOT / "bench" / "heartbeat_durability.py"
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_kill_9_loses_no_acknowledged_change_and_at_most_a_second_of_last_seen(
    tmp_path: Path, workers: int
) -> None:
    result = _harness().run(tmp_path, kills=3, workers=workers, machines_n=12, agent_threads=2)
    assert result.kills == 3
    assert result.heartbeats_acknowledged > 50 and result.changes_acknowledged > 5
    assert result.desired_acknowledged > 5
    assert result.integrity_failures == 0
    assert result.lost_changes == 0 and result.lost_desired == 0, result.problems
    assert result.last_seen_late == 0, result.problems
