"""The dashboard's fleet page: one page of machines, filtered and sorted, with counts.

A fixed number of statements whatever the fleet size: the whole fleet's counters
(status.counts, the status summary's own), how many machines match when a filter is
set, and one indexed or sorted read of a single page. Sync and stale are
status.SYNC_SQL / STALE_SQL (held to models.sync_of / is_stale); health is the stored
models.health_of of each machine's last report (HEALTH_SQL); the filters are
status.filter_sql, the one SQL form of a filters.MachineFilter. One spelling for
both backends but for the filter's (status.filter_sql).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime

from nixfleet.filters import MachineFilter
from nixfleet.models import Health, Lifecycle, Sync, isoformat, parse_time, stale_cutoff
from nixfleet.store import status
from nixfleet.store.conn import Connection, is_postgresql
from nixfleet.store.status import HEALTH_SQL, STALE_SQL, SYNC_SQL

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


def page(conn: Connection, q: FleetQuery, now: datetime, stale_after: int) -> FleetPage:
    """The counters of the whole fleet, how many match q, and page q.page of them."""
    cutoff = isoformat(stale_cutoff(now, stale_after)) or ""
    pred, params = status.filter_sql(q, cutoff, postgresql=is_postgresql(conn))
    whole = status.counts(conn, "", [], cutoff)  # the counters are the whole fleet's
    matching = whole.selected
    if pred:
        sql = f"SELECT count(*) FROM machines m WHERE {pred}"
        matching = conn.execute(sql, params).fetchone()[0]
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
        matching=int(matching),
        total=whole.selected,
        counted=whole.counted,
        stale=whole.stale,
        by_sync=whole.by_sync,
        by_health=whole.by_health,
        by_lifecycle=whole.by_lifecycle,
    )


def all_tags(conn: Connection, limit: int = 200) -> list[str]:
    """The first `limit` tags in use, in order (the tag filter's suggestions).

    A skip-scan of the machine_tag_rows_tag index: one seek per distinct tag, rather
    than a read of every machine's tags. The table, not the machine_tags view (every
    row has its machine): PostgreSQL does not seek a min() through the view's join,
    it reads all the tags per step (650 ms, not 1, at 20,000 machines); SQLite seeks
    either way.
    """
    rows = conn.execute(
        "WITH RECURSIVE t(tag) AS (SELECT min(tag) FROM machine_tag_rows UNION ALL "
        "SELECT (SELECT min(tag) FROM machine_tag_rows WHERE tag > t.tag) FROM t "
        "WHERE t.tag IS NOT NULL) SELECT tag FROM t WHERE tag IS NOT NULL LIMIT ?",
        (limit,),
    )
    return [r[0] for r in rows]
