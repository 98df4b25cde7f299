"""The dashboard's fleet page: one page of machines, filtered and sorted, with counts.

Two statements whatever the fleet size: one aggregate pass for the counters (by
sync, health, lifecycle, stale) and for how many machines match, and one indexed or
sorted read of a single page. Sync and stale are machines.SYNC_SQL / STALE_SQL (held
to models.sync_of / is_stale); health is HEALTH_SQL, held to models.health_of.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from datetime import datetime

from nixfleet.models import Health, Lifecycle, Sync, isoformat, parse_time, stale_cutoff
from nixfleet.store.machines import STALE_SQL, SYNC_SQL

HEALTH_SQL = (
    "CASE WHEN m.health_json IS NULL THEN 'unknown' "
    "WHEN json_extract(m.health_json, '$.all_passed') THEN 'healthy' ELSE 'failing' END"
)

# Sort keys the page offers; every order ends with the id, so pages are stable.
SORTS = {
    "host": "m.id",
    "lifecycle": "m.lifecycle",
    "sync": SYNC_SQL,
    "health": HEALTH_SQL,
    "last-report": "coalesce(m.last_report_at, '')",
}
MAX_PER_PAGE = 500


@dataclass(frozen=True)
class FleetQuery:
    tags: tuple[str, ...] = ()  # carrying all of these
    not_tags: tuple[str, ...] = ()  # carrying none of these
    lifecycle: Lifecycle | None = None
    sync: Sync | None = None
    health: Health | None = None
    stale: bool | None = None
    search: str = ""  # a substring of the host name, or a glob when it has * ? [
    sort: str = "host"
    descending: bool = False
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
    total: int  # the whole fleet
    stale: int
    by_sync: dict[Sync, int] = field(default_factory=dict)
    by_health: dict[Health, int] = field(default_factory=dict)
    by_lifecycle: dict[Lifecycle, int] = field(default_factory=dict)


def _predicate(q: FleetQuery, cutoff: str) -> tuple[str, list[object]]:
    """The filters as one SQL condition over machines m ('' when there is none)."""
    clauses: list[str] = []
    params: list[object] = []
    wanted = sorted(set(q.tags))
    if wanted:
        marks = ",".join("?" * len(wanted))
        clauses.append(
            f"m.id IN (SELECT machine_id FROM machine_tags WHERE tag IN ({marks}) "
            "GROUP BY machine_id HAVING COUNT(DISTINCT tag) = ?)"
        )
        params += [*wanted, len(wanted)]
    unwanted = sorted(set(q.not_tags))
    if unwanted:
        clauses.append(
            "NOT EXISTS (SELECT 1 FROM machine_tags t WHERE t.machine_id = m.id "
            f"AND t.tag IN ({','.join('?' * len(unwanted))}))"
        )
        params += unwanted
    for expr, value in (
        ("m.lifecycle", q.lifecycle),
        (f"({SYNC_SQL})", q.sync),
        (f"({HEALTH_SQL})", q.health),
    ):
        if value is not None:
            clauses.append(f"{expr} = ?")
            params.append(value.value)
    if q.stale is not None:
        clauses.append(STALE_SQL if q.stale else f"NOT {STALE_SQL}")
        params.append(cutoff)
    if q.search:
        if any(c in q.search for c in "*?["):
            clauses.append("m.id GLOB ?")
            params.append(q.search)
        else:
            clauses.append("instr(lower(m.id), lower(?)) > 0")
            params.append(q.search)
    return " AND ".join(clauses), params


def page(conn: sqlite3.Connection, q: FleetQuery, now: datetime, stale_after: int) -> FleetPage:
    """The counters of the whole fleet, how many match q, and page q.page of them."""
    cutoff = isoformat(stale_cutoff(now, stale_after)) or ""
    pred, params = _predicate(q, cutoff)
    sums = ", ".join(
        [f"sum(sync = '{s.value}')" for s in Sync]
        + [f"sum(health = '{h.value}')" for h in Health]
        + [f"sum(lifecycle = '{life.value}')" for life in Lifecycle]
    )
    # One pass over the fleet: the counters, and how many machines the filters select.
    counted = conn.execute(
        f"SELECT count(*), coalesce(sum(stale), 0), coalesce(sum(hit), 0), {sums} FROM ("
        f"SELECT {SYNC_SQL} AS sync, {HEALTH_SQL} AS health, m.lifecycle AS lifecycle, "
        f"{STALE_SQL} AS stale, {f'({pred})' if pred else '1'} AS hit FROM machines m)",
        (cutoff, *params),
    ).fetchone()
    n = [int(v or 0) for v in counted[3:]]
    syncs, healths = len(Sync), len(Health)
    matching = int(counted[2])
    where = f" WHERE {pred}" if pred else ""
    order = SORTS.get(q.sort, "m.id")
    direction = "DESC" if q.descending else "ASC"
    per_page = max(1, min(q.per_page, MAX_PER_PAGE))
    offset = (max(q.page, 1) - 1) * per_page
    rows = conn.execute(
        "SELECT m.id, m.lifecycle, m.current_generation, m.desired_generation, "
        f"{SYNC_SQL} AS sync, {HEALTH_SQL} AS health, m.last_report_at, {STALE_SQL} AS stale, "
        "m.system_state, m.last_message, m.tags_json "
        f"FROM machines m{where} ORDER BY {order} {direction}, m.id {direction} "
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
