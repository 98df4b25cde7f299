"""The dashboard's fleet page: one page of machines, filtered and sorted, with counts.

Two statements whatever the fleet size: one aggregate pass for the counters (by
sync, health, lifecycle, stale) and for how many machines match, and one indexed or
sorted read of a single page. Sync and stale are status.SYNC_SQL / STALE_SQL (held
to models.sync_of / is_stale); health is HEALTH_SQL, held to models.health_of; the
filters are status.filter_sql, the one SQL form of a filters.MachineFilter.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from datetime import datetime

from nixfleet.filters import MachineFilter
from nixfleet.models import Health, Lifecycle, Sync, isoformat, parse_time, stale_cutoff
from nixfleet.store import status
from nixfleet.store.status import HEALTH_SQL, STALE_SQL, SUMMARY_SQL, SYNC_SQL

# The sort keys the page offers (filters.SORT_KEYS; SQL in status.SORT_SQL).
SORTS = status.SORT_SQL
MAX_PER_PAGE = 500


@dataclass(frozen=True)
class FleetQuery(MachineFilter):
    """A filter (filters.MachineFilter, parsed once) and which page of it."""

    page: int = 1
    per_page: int = 50


@dataclass(frozen=True)
class FleetRow:
    id: str
    lifecycle: Lifecycle
    current_generation: str | None
    desired_generation: str | None
    sync: Sync
    health: Health
    last_report_at: datetime | None
    stale: bool
    system_state: str
    last_message: str | None
    tags: tuple[str, ...]


@dataclass(frozen=True)
class FleetPage:
    rows: list[FleetRow]
    matching: int  # machines the filters select (all pages)
    total: int  # the whole fleet, decommissioned machines included (all are listed)
    counted: int  # the machines the summary counts (models.counts_in_sync_summary)
    stale: int
    # by_sync and by_health count as the status summary does: decommissioned left out
    by_sync: dict[Sync, int] = field(default_factory=dict)
    by_health: dict[Health, int] = field(default_factory=dict)
    by_lifecycle: dict[Lifecycle, int] = field(default_factory=dict)


def page(conn: sqlite3.Connection, q: FleetQuery, now: datetime, stale_after: int) -> FleetPage:
    """The counters of the whole fleet, how many match q, and page q.page of them."""
    cutoff = isoformat(stale_cutoff(now, stale_after)) or ""
    pred, params = status.filter_sql(q, cutoff)
    sums = ", ".join(
        [f"sum(sync = '{s.value}' AND counted)" for s in Sync]
        + [f"sum(health = '{h.value}' AND counted)" for h in Health]
        + [f"sum(lifecycle = '{life.value}')" for life in Lifecycle]
    )
    # One pass over the fleet: the counters, and how many machines the filters select.
    counted = conn.execute(
        "SELECT count(*), coalesce(sum(stale), 0), coalesce(sum(hit), 0), "
        f"coalesce(sum(counted), 0), {sums} FROM ("
        f"SELECT {SYNC_SQL} AS sync, {HEALTH_SQL} AS health, m.lifecycle AS lifecycle, "
        f"{STALE_SQL} AS stale, {SUMMARY_SQL} AS counted, "
        f"{f'({pred})' if pred else '1'} AS hit FROM machines m)",
        (cutoff, *params),
    ).fetchone()
    n = [int(v or 0) for v in counted[4:]]
    syncs, healths = len(Sync), len(Health)
    matching = int(counted[2])
    where = f" WHERE {pred}" if pred else ""
    per_page = max(1, min(q.per_page, MAX_PER_PAGE))
    offset = (max(q.page, 1) - 1) * per_page
    rows = conn.execute(
        "SELECT m.id, m.lifecycle, m.current_generation, m.desired_generation, "
        f"{SYNC_SQL} AS sync, {HEALTH_SQL} AS health, m.last_report_at, {STALE_SQL} AS stale, "
        "m.system_state, m.last_message, m.tags_json "
        f"FROM machines m{where} ORDER BY {status.order_sql(q)} "
        "LIMIT ? OFFSET ?",
        (cutoff, *params, per_page, offset),
    )
    return FleetPage(
        rows=[
            FleetRow(
                id=r["id"],
                lifecycle=Lifecycle(r["lifecycle"]),
                current_generation=r["current_generation"],
                desired_generation=r["desired_generation"],
                sync=Sync(r["sync"]),
                health=Health(r["health"]),
                last_report_at=parse_time(r["last_report_at"]),
                stale=bool(r["stale"]),
                system_state=r["system_state"],
                last_message=r["last_message"],
                tags=tuple(json.loads(r["tags_json"])),
            )
            for r in rows
        ],
        matching=matching,
        total=int(counted[0]),
        counted=int(counted[3]),
        stale=int(counted[1]),
        by_sync=dict(zip(Sync, n[:syncs], strict=True)),
        by_health=dict(zip(Health, n[syncs : syncs + healths], strict=True)),
        by_lifecycle=dict(zip(Lifecycle, n[syncs + healths :], strict=True)),
    )


def all_tags(conn: sqlite3.Connection, limit: int = 200) -> list[str]:
    """The first `limit` tags in use, in order (the tag filter's suggestions).

    A skip-scan of the machine_tags_tag index: one seek per distinct tag, rather
    than a read of every machine's tags.
    """
    rows = conn.execute(
        "WITH RECURSIVE t(tag) AS (SELECT min(tag) FROM machine_tags UNION ALL "
        "SELECT (SELECT min(tag) FROM machine_tags WHERE tag > t.tag) FROM t "
        "WHERE t.tag IS NOT NULL) SELECT tag FROM t WHERE tag IS NOT NULL LIMIT ?",
        (limit,),
    )
    return [r[0] for r in rows]
