"""The reconciler with §11 policy on both backends (`any_store`): windows, budgets, leases.

Ticks run with explicit times (the windows' clock given to the tick), reports are
written as agents send them, and the budget is asserted after every tick.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from nixfleet import reconciler
from nixfleet.flake import release_from_document
from nixfleet.models import Lifecycle, Report
from nixfleet.policy import fleet
from nixfleet.store import leases, machines, releases
from nixfleet.store import rollouts as store_rollouts
from nixfleet.store.conn import AnyStore

MONDAY = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)
SUNDAY = MONDAY - timedelta(days=1)
HINT = 5


def gen(host: str) -> str:
    return f"/nix/store/{'n' * 32}-nixos-system-{host}"


def setup(store: AnyStore, hosts: dict[str, list[str]]) -> str:
    with store.transaction() as conn:
        for h, tags in hosts.items():
            machines.register(conn, h, tags, Lifecycle.ACTIVE, SUNDAY - timedelta(days=1))
        rel = release_from_document(
            {
                "entries": [
                    {"hostname": h, "store_path": gen(h), "platform": "x86_64-linux"} for h in hosts
                ]
            }
        )
        releases.insert(conn, rel, SUNDAY, "test")
    return rel.id


def apply(
    store: AnyStore, release: str, name: str, hosts: list[str], now: datetime, **kw: Any
) -> str:
    doc: dict[str, Any] = {
        "version": 1,
        "name": name,
        "release": release,
        "target": {"hosts": hosts},
        "strategy": "all-at-once",
        "health_timeout": "10m",
        **kw,
    }
    with store.transaction() as conn:
        return store_rollouts.apply(conn, doc, "key:test", now, HINT).id


def report_all(store: AnyStore, now: datetime, **kw: Any) -> None:
    """Every machine reports: on its desired generation if it has one (a quick agent)."""
    with store.transaction() as conn:
        for m in machines.list_machines(conn):
            current = m.desired_generation or m.current_generation or gen(m.id) + "-old"
            r = Report(m.id, now, current, **kw)
            machines.record_report(conn, r)


def tick(
    store: AnyStore,
    now: datetime,
    policy: fleet.FleetPolicy | None = None,
    window_now: datetime | None = None,
) -> None:
    ctx = reconciler.PolicyTick(policy or fleet.FleetPolicy(), 300, window_now or now)
    reconciler.tick(store, HINT, now, policy=ctx)


def in_flight(store: AnyStore, hosts: list[str]) -> int:
    """Machines of `hosts` given a rollout's generation and not yet judged healthy."""
    with store.read() as conn:
        marks = ",".join("?" * len(hosts))
        row = conn.execute(
            f"SELECT COUNT(*) FROM rollout_machines rm JOIN machines m ON m.id = rm.machine_id "
            f"WHERE rm.machine_id IN ({marks}) AND m.desired_generation = rm.store_path "
            "AND rm.health != 'healthy'",
            hosts,
        ).fetchone()
        return int(row[0])


def events(store: AnyStore, rid: str) -> list[str]:
    with store.read() as conn:
        return [
            r[0]
            for r in conn.execute(
                "SELECT kind FROM rollout_events WHERE rollout_id = ? ORDER BY id", (rid,)
            )
        ]


def status(store: AnyStore, rid: str) -> str:
    with store.read() as conn:
        return store_rollouts.detail(conn, rid, MONDAY).summary.status.value


def test_nothing_starts_until_the_clock_enters_the_window(any_store: AnyStore) -> None:
    store = any_store
    rel = setup(store, {"web-1": ["web"], "web-2": ["web"]})
    window = [{"days": ["mon"], "start": "09:00", "end": "11:00"}]
    rid = apply(store, rel, "office", ["web-1", "web-2"], SUNDAY, windows=window)
    for i in range(5):  # Sunday: ticks go by, nothing starts
        tick(store, SUNDAY + timedelta(seconds=2 * i))
        assert in_flight(store, ["web-1", "web-2"]) == 0
    assert events(store, rid).count("rollout-waiting-for-window") == 1  # once, not per tick
    with store.read() as conn:
        d = store_rollouts.detail(conn, rid, SUNDAY)
    assert d.batches[0].status.value == "pending"
    assert d.hold is not None and d.hold[0] == "waiting-for-window"
    assert "2026-12-07T09:00:00" in d.hold[1]
    # The same real time, the windows' clock moved into Monday 09:00: it starts.
    tick(store, SUNDAY + timedelta(seconds=20), window_now=MONDAY)
    assert in_flight(store, ["web-1", "web-2"]) == 2
    assert "batch-started" in events(store, rid)
    assert events(store, rid)[-1] == "rollout-hold-cleared"


def test_a_batch_needs_health_timeout_left_in_its_window(any_store: AnyStore) -> None:
    store = any_store
    rel = setup(store, {"web-1": ["web"]})
    window = [{"days": ["mon"], "start": "09:00", "end": "11:00"}]
    rid = apply(store, rel, "late", ["web-1"], SUNDAY, windows=window)
    tick(store, MONDAY + timedelta(minutes=115))  # 10:55: 5 minutes left, 10 needed
    assert in_flight(store, ["web-1"]) == 0
    assert "rollout-waiting-for-window" in events(store, rid)


def test_max_unavailable_starts_machine_by_machine(any_store: AnyStore) -> None:
    store = any_store
    hosts = {f"web-{i}": ["web"] for i in range(6)}
    rel = setup(store, hosts)
    rid = apply(store, rel, "web", list(hosts), MONDAY, max_unavailable=2)
    now = MONDAY
    seen = set()
    for _ in range(30):
        tick(store, now)
        flying = in_flight(store, list(hosts))
        assert flying <= 2
        seen.add(flying)
        report_all(store, now + timedelta(seconds=1))
        now += timedelta(seconds=2)
        if status(store, rid) == "completed":
            break
    assert status(store, rid) == "completed"
    assert 2 in seen
    kinds = events(store, rid)
    assert "rollout-held-by-budget" in kinds and "rollout-hold-cleared" in kinds


def test_a_fleet_budget_holds_across_two_rollouts(any_store: AnyStore) -> None:
    store = any_store
    hosts = {"db-1": ["db"], "db-2": ["db"], "db-3": ["db", "eu"], "db-4": ["db", "eu"]}
    rel = setup(store, hosts)
    budget = fleet.from_settings(disruption_budgets=[{"tags": ["db"], "max_in_flight": 1}])
    a = apply(store, rel, "a", ["db-1", "db-2"], MONDAY)
    b = apply(store, rel, "b", ["db-3", "db-4"], MONDAY)
    now = MONDAY
    for _ in range(40):
        tick(store, now, budget)
        assert in_flight(store, list(hosts)) <= 1  # at every tick
        report_all(store, now + timedelta(seconds=1))
        now += timedelta(seconds=2)
        if status(store, a) == status(store, b) == "completed":
            break
    assert status(store, a) == status(store, b) == "completed"


def test_a_stale_machine_counts_against_the_budget(any_store: AnyStore) -> None:
    store = any_store
    hosts = {"db-1": ["db"], "db-2": ["db"]}
    rel = setup(store, hosts)
    report_all(store, MONDAY - timedelta(hours=1))  # both heard from an hour ago
    report_all(store, MONDAY)
    with store.transaction() as conn:  # db-2 went quiet an hour ago: stale
        conn.execute(
            "UPDATE machines SET last_report_at = ? WHERE id = 'db-2'",
            ("2026-12-07T08:00:00.000000Z",),
        )
    budget = fleet.from_settings(disruption_budgets=[{"tags": ["db"], "max_in_flight": 1}])
    rid = apply(store, rel, "db", ["db-1"], MONDAY)
    for i in range(4):
        tick(store, MONDAY + timedelta(seconds=2 * i), budget)
    assert in_flight(store, ["db-1"]) == 0
    with store.read() as conn:
        hold = store_rollouts.detail(conn, rid, MONDAY).hold
    assert hold is not None and hold[0] == "held-by-budget"
    assert hold[1].startswith("disruption budget [db]")
    assert "rollout-held-by-budget" in events(store, rid)


def test_an_expired_reboot_lease_fails_the_batch_and_frees_the_slot(any_store: AnyStore) -> None:
    store = any_store
    hosts = {"db-1": ["db"], "db-2": ["db"]}
    rel = setup(store, hosts)
    policy = fleet.from_settings(reboot_timeout=600)
    rid = apply(store, rel, "kernel", ["db-1", "db-2"], MONDAY, reboot="when-needed")
    tick(store, MONDAY, policy)
    report_all(store, MONDAY + timedelta(seconds=1), needs_reboot=True)
    with store.transaction() as conn:
        leases.take(conn, "db-1", policy, MONDAY + timedelta(seconds=2), "machine:db-1")
    tick(store, MONDAY + timedelta(seconds=3), policy)
    assert status(store, rid) == "running"  # needs a reboot: not healthy yet
    # db-1 never comes back; db-2 still waits for its reboot slot.
    tick(store, MONDAY + timedelta(seconds=603), policy)
    with store.read() as conn:
        held = [r[0] for r in conn.execute("SELECT machine_id FROM reboot_leases")]
        d = store_rollouts.detail(conn, rid, MONDAY + timedelta(seconds=603))
    assert held == []
    machines_ = {m.id: m for b in d.batches for m in b.machines}
    assert machines_["db-1"].health.value == "unhealthy"
    assert "did not come back" in machines_["db-1"].reason
    assert machines_["db-2"].health.value in ("pending", "unhealthy")
    assert d.summary.status.value == "paused"  # failure_threshold 0: the batch failed
    assert "reboot-lease-expired" in events(store, rid)


def test_a_rebooted_machine_is_released_and_judged_healthy(any_store: AnyStore) -> None:
    store = any_store
    rel = setup(store, {"db-1": ["db"]})
    policy = fleet.from_settings()
    rid = apply(store, rel, "kernel", ["db-1"], MONDAY, reboot="when-needed")
    tick(store, MONDAY, policy)
    report_all(store, MONDAY + timedelta(seconds=1), needs_reboot=True)
    with store.transaction() as conn:
        leases.take(conn, "db-1", policy, MONDAY + timedelta(seconds=2), "machine:db-1")
    tick(store, MONDAY + timedelta(seconds=3), policy)
    assert status(store, rid) == "running"
    with store.read() as conn:
        d = store_rollouts.detail(conn, rid, MONDAY + timedelta(seconds=4))
    assert d.batches[0].machines[0].reason == "rebooting"  # what `rollout status` shows
    report_all(store, MONDAY + timedelta(seconds=30), needs_reboot=False)  # back, healthy
    tick(store, MONDAY + timedelta(seconds=31), policy)
    assert status(store, rid) == "completed"
    kinds = events(store, rid)
    assert kinds.index("machine-rebooting") < kinds.index("machine-rebooted")
