"""The SQL forms of sync and stale (store.machines) agree with models, case by case.

The cases are generated: every combination of desired, current and failed generation
from a small alphabet (None included), and report times on and around the stale
cutoff (a zero fraction included, the old trap of comparing stored strings).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

import pytest

from nixfleet.models import (
    Lifecycle,
    counts_in_sync_summary,
    is_stale,
    isoformat,
    stale_cutoff,
    sync_of,
)
from nixfleet.store import Store
from nixfleet.store.status import STALE_SQL, SUMMARY_SQL, SYNC_SQL

A, B = "/nix/store/" + "a" * 32 + "-a", "/nix/store/" + "b" * 32 + "-b"
GENERATIONS = (None, A, B)
NOW = datetime(2026, 11, 27, 10, 0, 0, tzinfo=UTC)
STALE_AFTER = 300


def _sql(store: Store, expression: str, columns: Mapping[str, object], *params: object) -> object:
    # The expression's own parameters come first in the text, so they bind first.
    names = ", ".join(f"? AS {name}" for name in columns)
    with store.read() as conn:
        row = conn.execute(
            f"SELECT {expression} FROM (SELECT {names}) m", (*params, *columns.values())
        ).fetchone()
    return row[0]


@pytest.mark.parametrize(
    ("desired", "current", "failed"), list(itertools.product(GENERATIONS, repeat=3))
)
def test_sync_sql_is_sync_of(
    store: Store, desired: str | None, current: str | None, failed: str | None
) -> None:
    columns = {
        "desired_generation": desired,
        "current_generation": current,
        "failed_generation": failed,
    }
    assert _sql(store, SYNC_SQL, columns) == sync_of(desired, current, failed).value


OFFSETS = [None] + [
    timedelta(seconds=s, microseconds=u) for s in (-301, -300, -299, 0) for u in (-1, 0, 1)
]


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("now", [NOW, NOW + timedelta(microseconds=500_000)])
@pytest.mark.parametrize("lifecycle", list(Lifecycle))
def test_stale_sql_is_is_stale(
    store: Store, offset: timedelta | None, now: datetime, lifecycle: Lifecycle
) -> None:
    last = None if offset is None else now + offset
    columns = {"last_report_at": isoformat(last), "lifecycle": lifecycle.value}
    cutoff = isoformat(stale_cutoff(now, STALE_AFTER))
    expected = is_stale(last, now, STALE_AFTER, lifecycle)
    assert bool(_sql(store, STALE_SQL, columns, cutoff)) is expected


@pytest.mark.parametrize("lifecycle", list(Lifecycle))
def test_summary_sql_is_counts_in_sync_summary(store: Store, lifecycle: Lifecycle) -> None:
    columns = {"lifecycle": lifecycle.value}
    assert bool(_sql(store, SUMMARY_SQL, columns)) is counts_in_sync_summary(lifecycle)
