"""kill -9 under write load loses no acknowledged write (bench/hostile.py, CI-sized).

The full run (`python bench/hostile.py durability --kills 50`) is documented in
docs/control-plane.md; here a few kills keep CI short.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from conftest import ROOT, load_file


def _harness() -> ModuleType:
    return load_file("nixfleet_bench_hostile", ROOT / "bench" / "hostile.py")


def test_kill_9_loses_no_acknowledged_write(tmp_path: Path) -> None:
    result = _harness().durability(tmp_path, kills=4, writers=3)
    assert result.kills == 4
    assert result.acknowledged > 20  # the writers got through between the kills
    assert result.lost == 0, result.lost_ids
    assert result.refused_5xx == 0
