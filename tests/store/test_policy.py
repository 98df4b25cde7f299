"""The SQL twins of the budget rules held to nixfleet.policy.budgets, case by case,
on both backends (`any_store`)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from nixfleet.flake import release_from_document
from nixfleet.models import Lifecycle, MachineHealth, isoformat
from nixfleet.policy import budgets
from nixfleet.policy.budgets import Budget, MachineState, MaxUnavailable
from nixfleet.store import machines, releases
from nixfleet.store import policy as store_policy
from nixfleet.store import rollouts as store_rollouts
from nixfleet.store.conn import AnyStore, is_postgresql

T0 = datetime(2026, 12, 7, 10, 0, tzinfo=UTC)
STALE_AFTER = 300
TAGSETS = [("web",), ("db",), ("db", "prod"), ("web", "prod"), ("prod",), ()]


def gen(host: str) -> str:
    return f"/nix/store/{'n' * 32}-nixos-system-{host}"


def make(store: AnyStore, tagsets: list[tuple[str, ...]]) -> tuple[str, list[str]]:
    """One machine per tag set, and an all-at-once rollout over them (batch 0)."""
    hosts = [f"h-{i:03}" for i in range(len(tagsets))]
    with store.transaction() as conn:
        for h, tags in zip(hosts, tagsets, strict=True):
            machines.register(conn, h, list(tags), Lifecycle.ACTIVE, T0)
        rel = release_from_document(
            {
                "entries": [
                    {"hostname": h, "store_path": gen(h), "platform": "x86_64-linux"} for h in hosts
                ]
            }
        )
        releases.insert(conn, rel, T0, "test")
        doc = {
            "version": 1,
            "name": "r",
            "release": rel.id,
            "target": {"hosts": hosts},
            "strategy": "all-at-once",
        }
        rid = store_rollouts.apply(conn, doc, "key:test", T0, 5).id
    return rid, hosts


def set_state(conn: Any, rid: str, host: str, pos: int, s: MachineState) -> None:
    last = T0 - timedelta(seconds=STALE_AFTER + 1) if s.stale else T0
    conn.execute(
        "UPDATE machines SET last_report_at = ?, system_state = ? WHERE id = ?",
        (isoformat(last), "error" if s.failing else "ok", host),
    )
    conn.execute(
        "UPDATE rollout_machines SET health = ? WHERE rollout_id = ? AND machine_id = ?",
        (s.health.value, rid, host),
    )
    if s.rebooting:
        conn.execute(
            "INSERT INTO reboot_leases VALUES ('default', ?, ?, ?, ?)",
            (host, rid, isoformat(T0), isoformat(T0 + timedelta(hours=1))),
        )


STATES = [
    MachineState(),
    MachineState(started=True),
    MachineState(started=True, health=MachineHealth.HEALTHY),
    MachineState(started=True, health=MachineHealth.UNHEALTHY),
    MachineState(stale=True),
    MachineState(failing=True),
    MachineState(rebooting=True, started=True, health=MachineHealth.HEALTHY),
    MachineState(started=True, health=MachineHealth.HEALTHY, stale=True),
]


def test_unavailable_sql_is_the_pure_rule(any_store: AnyStore) -> None:
    store = any_store
    rid, hosts = make(store, [("web",)] * len(STATES))
    # Machines at positions 0..started_until are started: put the started states first.
    order = sorted(range(len(STATES)), key=lambda i: not STATES[i].started)
    started = sum(1 for s in STATES if s.started)
    with store.transaction() as conn:
        conn.execute(
            "UPDATE rollout_batches SET status = 'deploying', started_at = ?, started_until = ? "
            "WHERE rollout_id = ?",
            (isoformat(T0), started - 1, rid),
        )
        for pos, i in enumerate(order):
            set_state(conn, rid, hosts[pos], pos, STATES[i])
        store_policy.collect(conn, T0, STALE_AFTER)
        temp = "pg_temp" if is_postgresql(conn) else "temp"
        got = {r[0] for r in conn.execute(f"SELECT machine_id FROM {temp}.unavailable")}
        count = store_policy.unavailable_targets(conn, rid)
    expected = {hosts[pos] for pos, i in enumerate(order) if budgets.unavailable(STATES[i])}
    assert got == expected
    assert count == len(expected)


def _case(rng: random.Random) -> tuple[list[tuple[str, ...]], list[Budget], list[int], Any]:
    n = rng.randint(1, 12)
    tagsets = [rng.choice(TAGSETS) for _ in range(n)]
    chosen = rng.sample(
        [Budget(("db",), 1), Budget(("prod",), 3), Budget(("db", "prod"), 2)], rng.randint(0, 3)
    )
    flight = [rng.randint(0, b.max_in_flight + 1) for b in chosen]
    limit = rng.choice([None, MaxUnavailable(rng.randint(1, 6)), MaxUnavailable(50, True)])
    return tagsets, chosen, flight, limit


@pytest.mark.parametrize("seed", range(40))
def test_admitted_sql_is_the_pure_admit(any_store: AnyStore, seed: int) -> None:
    store = any_store
    rng = random.Random(seed)
    tagsets, chosen, flight, limit = _case(rng)
    rid, _hosts = make(store, tagsets)
    unavailable = rng.randint(0, 3)
    limits = budgets.rooms(limit, len(tagsets), unavailable, chosen, flight)
    after = rng.randint(-1, len(tagsets) - 2)
    until = rng.randint(after + 1, len(tagsets) - 1)
    pure = budgets.admit([frozenset(t) for t in tagsets[after + 1 : until + 1]], limits)
    with store.read() as conn:
        count, held_by = store_policy.admitted(conn, rid, 0, after, until, limits)
    assert (count, held_by) == (pure.count, pure.held_by), (tagsets, limits, after, until)


def test_in_flight_counts_all_of_tag_selectors(any_store: AnyStore) -> None:
    store = any_store
    rid, hosts = make(store, [("db", "prod"), ("db",), ("prod",), ("web",)])
    with store.transaction() as conn:
        for h in hosts:
            set_state(conn, rid, h, 0, MachineState(stale=True))
        store_policy.collect(conn, T0, STALE_AFTER)
        assert store_policy.in_flight(conn, Budget(("db",), 1)) == 2
        assert store_policy.in_flight(conn, Budget(("db", "prod"), 1)) == 1
        assert store_policy.in_flight(conn, Budget(("cache",), 1)) == 0


def test_plan_facts_read_only_are_the_tick_s_counts(any_store: AnyStore) -> None:
    """`rollout plan` counts in a read-only transaction (no temp table on PostgreSQL)
    what the tick counts from temp.unavailable."""
    rid, hosts = make(any_store, [("db", "prod"), ("db",), ("prod",), ("web",)])
    chosen = [Budget(("db",), 1), Budget(("db", "prod"), 1), Budget(("cache",), 1)]
    with any_store.transaction() as conn:
        for h in hosts[:3]:
            set_state(conn, rid, h, 0, MachineState(stale=True))
    with any_store.read() as conn:
        tags, down, flight = store_policy.plan_facts(
            conn, [*hosts[1:], hosts[1]], T0, STALE_AFTER, chosen
        )
    assert tags == {
        "h-001": frozenset({"db"}),
        "h-002": frozenset({"prod"}),
        "h-003": frozenset({"web"}),
    }
    assert (down, flight) == (2, [2, 1, 0])
