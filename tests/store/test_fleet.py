"""The dashboard's fleet page query (store.fleet): the stored health is models.health_of,
and every filter, sort and page checked against the same rule computed in Python
over list_machines, on a generated fleet in each backend (`any_store`).
"""

from __future__ import annotations

import fnmatch
import itertools
import random
from datetime import UTC, datetime, timedelta

import pytest

from nixfleet.filters import MachineFilter
from nixfleet.models import (
    Health,
    HealthCheckResult,
    HealthResult,
    Lifecycle,
    Machine,
    Report,
    Sync,
    health_of,
    is_stale,
    isoformat,
)
from nixfleet.store import fleet, machines, status
from nixfleet.store.conn import AnyStore
from nixfleet.store.fleet import FleetQuery
from nixfleet.store.status import HEALTH_SQL

NOW = datetime(2026, 12, 2, 12, 0, 0, tzinfo=UTC)
STALE_AFTER = 300


@pytest.mark.parametrize(
    "health",
    [
        None,
        HealthResult(all_passed=True),
        HealthResult(all_passed=False),
        HealthResult(True, (HealthCheckResult("a", "systemd", True),)),
        HealthResult(False, (HealthCheckResult("a", "systemd", False),)),
    ],
)
def test_the_stored_health_is_health_of_the_report(
    any_store: AnyStore, health: HealthResult | None
) -> None:
    """HEALTH_SQL reads the value record_report stored: models.health_of of the report,
    also after a report that changed it (the previous one had the opposite outcome)."""
    store = any_store
    before = HealthResult(not (health is not None and health.all_passed))
    with store.transaction() as conn:
        machines.register(conn, "web-01", [], Lifecycle.PENDING, NOW)
        for h in (before, health):
            report = Report("web-01", NOW, gen("web-01", "a"), success=True, health=h)
            machines.record_report(conn, report)
    with store.read() as conn:
        row = conn.execute(f"SELECT {HEALTH_SQL} FROM machines m").fetchone()
        assert row[0] == health_of(health).value


def gen(host: str, salt: str) -> str:
    return f"/nix/store/{salt * 32}-nixos-system-{host}"


@pytest.fixture
def fleet_store(any_store: AnyStore) -> AnyStore:
    store = any_store
    rng = random.Random(7)
    tags = ["web", "db", "prod", "canary", "edge"]
    with store.transaction() as conn:
        for i in range(120):
            host = f"{rng.choice(['web', 'db', 'edge'])}-{i:03}"
            machines.register(
                conn, host, rng.sample(tags, rng.randint(0, 3)), Lifecycle.PENDING, NOW
            )
            if rng.random() < 0.15:
                continue  # never reported
            if rng.random() < 0.3:
                machines.set_desired(conn, host, gen(host, "b"), None, "operator", NOW)
            ok = rng.random() < 0.8
            health = rng.choice(
                [
                    None,
                    HealthResult(True),
                    HealthResult(False, (HealthCheckResult("x", "k", False),)),
                ]
            )
            age = rng.choice([10, 200, 299, 301, 5000])
            report = Report(
                machine_id=host,
                received_at=NOW - timedelta(seconds=age),
                current_generation=gen(host, "b" if ok and rng.random() < 0.5 else "a"),
                success=ok,
                attempted_generation=None if ok else gen(host, "b"),
                health=health,
                tags=tuple(rng.sample(tags, rng.randint(0, 2))),
            )
            machines.record_report(conn, report)
        conn.execute("UPDATE machines SET lifecycle = 'maintenance' WHERE id LIKE '%7'")
    return store


def expected(store: AnyStore, q: FleetQuery) -> list[str]:
    with store.read() as conn:
        every = machines.list_machines(conn)

    def keep(m: Machine) -> bool:
        return (
            set(q.tags) <= set(m.tags)
            and not set(q.not_tags) & set(m.tags)
            and (q.lifecycle is None or m.lifecycle is q.lifecycle)
            and (q.sync is None or m.sync is q.sync)
            and (q.health is None or health_of(m.health) is q.health)
            and (q.stale is None or is_stale(m.last_report_at, NOW, STALE_AFTER) == q.stale)
            and (
                not q.search
                or (
                    fnmatch.fnmatchcase(m.id, q.search)
                    if any(c in q.search for c in "*?[")
                    else q.search.lower() in m.id.lower()
                )
            )
        )

    return [m.id for m in every if keep(m)]


QUERIES = [
    FleetQuery(),
    FleetQuery(tags=("prod",)),
    FleetQuery(tags=("prod", "web")),
    FleetQuery(not_tags=("canary",)),
    FleetQuery(tags=("prod",), not_tags=("canary", "edge")),
    FleetQuery(lifecycle=Lifecycle.MAINTENANCE),
    FleetQuery(lifecycle=Lifecycle.PENDING),
    *(FleetQuery(sync=s) for s in Sync),
    *(FleetQuery(health=h) for h in Health),
    FleetQuery(stale=True),
    FleetQuery(stale=False),
    FleetQuery(search="WEB-0"),
    FleetQuery(search="db-*1"),
    FleetQuery(search="zzz"),
    FleetQuery(tags=("web",), sync=Sync.FAILED, stale=False),
]


@pytest.mark.parametrize("q", QUERIES)
def test_filters_select_what_the_python_rules_select(fleet_store: AnyStore, q: FleetQuery) -> None:
    want = expected(fleet_store, q)
    q = FleetQuery(**{**q.__dict__, "per_page": 500})
    with fleet_store.read() as conn:
        got = fleet.page(conn, q, NOW, STALE_AFTER)
        listed = machines.list_filtered(conn, q, NOW, STALE_AFTER)
    assert [r.id for r in got.rows] == want
    assert got.matching == len(want)
    assert [m.id for m in listed] == want


def test_counters_are_the_whole_fleet_whatever_the_filter(fleet_store: AnyStore) -> None:
    with fleet_store.read() as conn:
        every = machines.list_machines(conn)
        got = fleet.page(conn, FleetQuery(tags=("db",), per_page=1), NOW, STALE_AFTER)
        doc = status.status_document(conn, MachineFilter(), NOW, STALE_AFTER)
    assert got.total == len(every) == doc.counts.selected == doc.counts.counted
    assert got.stale == doc.counts.stale
    for s in Sync:
        assert got.by_sync[s] == doc.counts.by_sync[s] == sum(m.sync is s for m in every)
    for h in Health:
        assert got.by_health[h] == doc.counts.by_health[h]
        assert got.by_health[h] == sum(health_of(m.health) is h for m in every)
    for life in Lifecycle:
        assert got.by_lifecycle[life] == doc.counts.by_lifecycle[life]


@pytest.mark.parametrize(
    ("sort", "descending"), list(itertools.product(fleet.SORTS, (False, True)))
)
def test_sorted_pages_cover_the_fleet_once_in_order(
    fleet_store: AnyStore, sort: str, descending: bool
) -> None:
    with fleet_store.read() as conn:
        every = {m.id: m for m in machines.list_machines(conn)}
        seen: list[str] = []
        for n in itertools.count(1):
            q = FleetQuery(sort=sort, descending=descending, page=n, per_page=25)
            rows = fleet.page(conn, q, NOW, STALE_AFTER).rows
            if not rows:
                break
            seen += [r.id for r in rows]

    def key(host: str) -> tuple[str, str]:
        m = every[host]
        value = {
            "host": m.id,
            "lifecycle": m.lifecycle.value,
            "sync": m.sync.value,
            "health": health_of(m.health).value,
            "last-report": isoformat(m.last_report_at) or "",
        }[sort]
        return (value, m.id)

    assert seen == sorted(every, key=key, reverse=descending)


def test_rows_carry_what_the_table_shows(fleet_store: AnyStore) -> None:
    with fleet_store.read() as conn:
        every = {m.id: m for m in machines.list_machines(conn)}
        rows = fleet.page(conn, FleetQuery(per_page=500), NOW, STALE_AFTER).rows
    for r in rows:
        m = every[r.id]
        assert (r.lifecycle, r.current_generation, r.desired_generation) == (
            m.lifecycle,
            m.current_generation,
            m.desired_generation,
        )
        assert r.sync is m.sync
        assert r.health is health_of(m.health)
        assert r.stale == is_stale(m.last_report_at, NOW, STALE_AFTER)
        assert r.tags == m.tags
        assert r.last_report_at == m.last_report_at


def test_tag_suggestions_are_the_tags_in_use_in_order(fleet_store: AnyStore) -> None:
    with fleet_store.read() as conn:
        every = machines.list_machines(conn)
        assert fleet.all_tags(conn, limit=3) == sorted({t for m in every for t in m.tags})[:3]
        assert fleet.all_tags(conn) == sorted({t for m in every for t in m.tags})
