"""Rows into the store's dataclasses, by column name (DESIGN rule 9: no positions).

`from_row` fills each field of a frozen dataclass from the column of the same name;
the fields a column cannot give as it is (JSON to decode, a column of another name,
a nested dataclass) are passed as keywords. One mapper, so a field added to a
dataclass is read by every query that selects its column.

The stored forms of values that are not a column's plain type live here too, each
with its inverse: health results (machines.health_json).
"""

from __future__ import annotations

import json
from dataclasses import fields
from typing import TYPE_CHECKING, Any, TypeVar

from nixfleet.heartbeat import HealthKey
from nixfleet.models import HealthCheckResult, HealthResult
from nixfleet.store.conn import Row

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


def from_row(cls: type[T], row: Row, **given: Any) -> T:
    """A `cls` from `row`: each field the column of its name, unless `given`."""
    return cls(**{f.name: given[f.name] if f.name in given else row[f.name] for f in fields(cls)})


# machines.health_json (migration 0021): the wire shape's values in its key order,
# booleans as 0/1 — `[all_passed, [[name, kind, passed, duration_ms, message], ...]]` —
# a third of the object's bytes, which 100,000 machines store once each.


def health_to_stored(health: HealthResult) -> str:
    results = [[r.name, r.kind, int(r.passed), r.duration_ms, r.message] for r in health.results]
    return json.dumps([int(health.all_passed), results], separators=(",", ":"), ensure_ascii=False)


def health_from_stored(text: str | None) -> HealthResult | None:
    if text is None:
        return None
    passed, results = json.loads(text)
    return HealthResult(
        bool(passed),
        tuple(HealthCheckResult(n, k, bool(p), d, m) for n, k, p, d, m in results),
    )


def stored_health_key(text: str | None) -> HealthKey | None:
    """heartbeat.health_key of a stored health result, without building the dataclasses."""
    if text is None:
        return None
    passed, results = json.loads(text)
    return bool(passed), tuple((n, k, bool(p), m) for n, k, p, _, m in results)
