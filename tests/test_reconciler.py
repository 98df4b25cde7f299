"""The reconciler on both backends (`any_store`): ticks with explicit times, reports as agents
send them. The store of an old SQLite schema is SQLite's alone."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from conftest import store_before

from nixfleet import reconciler, wire
from nixfleet.api.rollouts import detail_json
from nixfleet.cli import rollout as cli_rollout
from nixfleet.errors import ConflictError, NotFoundError, ValidationError
from nixfleet.flake import release_from_document
from nixfleet.history import EventKind
from nixfleet.models import Lifecycle, Report
from nixfleet.store import Store, audit, history, machines, planning, releases, rollout_control
from nixfleet.store import rollouts as store_rollouts
from nixfleet.store.conn import AnyStore

T0 = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)
HINT = 5


def gen(name: str, salt: str = "n") -> str:
    return f"/nix/store/{salt * 32}-nixos-system-{name}"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def setup_fleet(
    store: AnyStore, n: int = 10, release_hosts: int | None = None, desired: bool = True
) -> str:
    """n machines web-00.. tagged web, each with its own previous desired generation
    (with `desired`; without, none: a schema older than the history table has no events)."""
    hosts = [f"web-{i:02}" for i in range(n)]
    with store.transaction() as conn:
        for h in hosts:
            machines.register(conn, h, ["web"], Lifecycle.ACTIVE, T0)
            if desired:
                cache = f"https://old-cache/{h}"
                machines.set_desired(conn, h, gen(h, "o"), cache, "operator", T0)
        doc = {
            "cache_url": "https://cache.example.com",
            "entries": [
                {"hostname": h, "store_path": gen(h), "platform": "x86_64-linux", "tags": ["web"]}
                for h in hosts[: release_hosts if release_hosts is not None else n]
            ],
        }
        rel = release_from_document(doc)
        releases.insert(conn, rel, T0, "test")
    return rel.id


def rollout_doc(release: str, **kw: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "version": 1,
        "name": "web-rollout",
        "release": release,
        "target": {"tags": ["web"]},
        "strategy": "staged",
        "batches": [1, "25%", "100%"],
        "health_timeout": "5m",
    }
    doc.update(kw)
    return doc


def apply(store: AnyStore, doc: dict[str, Any], now: datetime = T0) -> str:
    with store.transaction() as conn:
        return store_rollouts.apply(conn, doc, "key:test", now, HINT).id


def tick(store: AnyStore, now: datetime) -> None:
    reconciler.tick(store, HINT, now)


def report(store: AnyStore, host: str, when: datetime, ok: bool = True, **kw: Any) -> None:
    m = machine(store, host)
    r = Report(
        machine_id=host,
        received_at=when,
        current_generation=m.desired_generation if ok else gen(host, "o"),
        success=ok,
        message="deployed" if ok else "rolled back: fake.service failed",
        attempted_generation=None if ok else m.desired_generation,
        **kw,
    )
    with store.transaction() as conn:
        machines.record_report(conn, r)


def machine(store: AnyStore, host: str) -> machines.Machine:  # type: ignore[name-defined]
    with store.read() as conn:
        return machines.get(conn, host)


def detail(store: AnyStore, rid: str, now: datetime) -> dict[str, Any]:
    with store.read() as conn:
        return dict(detail_json(store_rollouts.detail(conn, rid, now)))


def deploying_hosts(store: AnyStore, rid: str, now: datetime) -> list[str]:
    d = detail(store, rid, now)
    return [m["id"] for b in d["batches"] if b["status"] == "deploying" for m in b["machines"]]


def drive(store: AnyStore, rid: str, start: float, fail: set[str] = frozenset()) -> float:  # type: ignore[assignment]
    """Tick, report for every deploying machine, tick again, until nothing deploys."""
    t = start
    for _ in range(20):
        tick(store, at(t))
        hosts = deploying_hosts(store, rid, at(t))
        if not hosts:
            return t
        for h in hosts:
            report(store, h, at(t + 1), ok=h not in fail)
        t += 2
    raise AssertionError("rollout did not settle")


def test_staged_rollout_completes_batch_by_batch(any_store: AnyStore) -> None:
    store = any_store
    rel = setup_fleet(store)
    rid = apply(store, rollout_doc(rel))
    d = detail(store, rid, T0)
    assert [b["size"] for b in d["batches"]] == [1, 3, 6]
    assert d["status"] == "running"
    # Nothing changes desired before the first tick; the poll hint is set at once.
    assert machine(store, "web-00").desired_generation == gen("web-00", "o")
    tick(store, at(0))
    m = machine(store, "web-00")
    assert m.desired_generation == gen("web-00")
    assert m.desired_cache_url == "https://cache.example.com"
    assert m.desired_source == "rollout:web-rollout"
    assert machine(store, "web-01").desired_generation == gen("web-01", "o")  # batch 2 waits
    drive(store, rid, 1)
    d = detail(store, rid, at(100))
    assert d["status"] == "completed"
    assert [b["status"] for b in d["batches"]] == ["succeeded"] * 3
    assert all(m["health"] == "healthy" for b in d["batches"] for m in b["machines"])
    with store.read() as conn:
        hints = {r[0] for r in conn.execute("SELECT poll_hint FROM machines")}
        events = [e["kind"] for e in d["events"]]
        audited = [a.action for a in audit.query(conn, actor="reconciler", limit=1000)]
    assert hints == {None}
    assert events[0] == "rollout-created" and events[-1] == "rollout-completed"
    assert events.count("batch-started") == 3 and events.count("batch-succeeded") == 3
    assert "rollout.rollout-completed" in audited
    assert machine(store, "web-09").sync.value == "in sync"


def test_failure_pauses_then_resume_completes(any_store: AnyStore) -> None:
    store = any_store
    rel = setup_fleet(store)
    rid = apply(store, rollout_doc(rel))
    t = drive(store, rid, 0, fail={"web-02"})
    d = detail(store, rid, at(t))
    assert d["status"] == "paused"
    assert [b["status"] for b in d["batches"]] == ["succeeded", "failed", "pending"]
    bad = next(m for m in d["batches"][1]["machines"] if m["id"] == "web-02")
    assert bad["health"] == "unhealthy"
    assert bad["reason"].startswith("agent reported failure")
    # The failed machine shows as failed in `status`; its desired stays the release's.
    assert machine(store, "web-02").sync.value == "failed"
    with store.read() as conn:
        assert (
            conn.execute("SELECT poll_hint FROM machines WHERE id='web-02'").fetchone()[0] is None
        )
    tick(store, at(t + 1))  # paused: nothing happens
    assert detail(store, rid, at(t + 1))["status"] == "paused"
    # The operator fixes the machine; resume re-runs the failed batch.
    with store.transaction() as conn:
        rollout_control.control(conn, "web-rollout", "resume", "key:ops", at(t + 2), HINT)
    t = drive(store, rid, t + 3)
    d = detail(store, rid, at(t))
    assert d["status"] == "completed"
    assert [b["status"] for b in d["batches"]] == ["succeeded"] * 3
    kinds = [e["kind"] for e in d["events"]]
    assert "rollout-resumed" in kinds and "batch-requeued" in kinds


def test_each_machine_judged_unhealthy_is_one_webhook_event(any_store: AnyStore) -> None:
    store = any_store
    rel = setup_fleet(store)
    rid = apply(store, rollout_doc(rel))
    t = drive(store, rid, 0, fail={"web-02", "web-03"})
    assert detail(store, rid, at(t))["status"] == "paused"
    with store.read() as conn:
        hooks = conn.execute(
            "SELECT rollout_id, machine_id, detail_json FROM webhook_outbox "
            "WHERE event = 'machine.unhealthy' ORDER BY id"
        ).fetchall()
    reason = "agent reported failure: rolled back: fake.service failed"
    assert [(h[0], h[1], json.loads(h[2])) for h in hooks] == [
        (rid, h, {"reason": reason, "batch": 1}) for h in ("web-02", "web-03")
    ]


def test_rollout_status_shows_the_failing_machines_switch_output(
    any_store: AnyStore, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 19: why a switch failed, without ssh: the output tail in `rollout status`."""
    store = any_store
    rel = setup_fleet(store)
    rid = apply(store, rollout_doc(rel))
    tick(store, at(0))  # batch 1: web-00
    noise = "".join(f"activating unit {i}\n" for i in range(2000))
    output = noise + "warning: the following units failed: fake.service\x1b[0m"
    report(store, "web-00", at(1), ok=False, output=output)
    tick(store, at(2))
    d = detail(store, rid, at(2))
    assert d["status"] == "paused"
    (m,) = d["batches"][0]["machines"]
    assert m["health"] == "unhealthy"
    assert m["failed_output"] == output[-store_rollouts.OUTPUT_TAIL :]
    assert all("failed_output" not in x for b in d["batches"][1:] for x in b["machines"])
    cli_rollout.render(cast(wire.Rollout, d))
    shown = capsys.readouterr().out
    assert "switch output of web-00 (last 10 lines; all of it: nixfleet machines show web-00)" in (
        shown
    )
    assert "    warning: the following units failed: fake.service" in shown
    assert "activating unit 1991\n" in shown and "activating unit 1990\n" not in shown
    assert "\x1b" not in shown


def test_revert_restores_each_machines_own_previous_desired(any_store: AnyStore) -> None:
    store = any_store
    rel = setup_fleet(store)
    with store.transaction() as conn:  # one machine had no desired generation at all
        machines.set_desired(conn, "web-01", None, None, None, T0)
    rid = apply(store, rollout_doc(rel, on_failure="revert"))
    t = drive(store, rid, 0, fail={"web-03"})
    d = detail(store, rid, at(t))
    assert d["status"] == "failed"
    for i in range(10):
        h = f"web-{i:02}"
        m = machine(store, h)
        if h == "web-01":
            assert (m.desired_generation, m.desired_cache_url, m.desired_source) == (
                None,
                None,
                None,
            )
        else:
            assert m.desired_generation == gen(h, "o"), h
            assert m.desired_cache_url == f"https://old-cache/{h}"
            assert m.desired_source == "operator"
    assert "rollout-reverted" in [e["kind"] for e in d["events"]]


def test_health_timeout_and_soak(any_store: AnyStore) -> None:
    store = any_store
    rel = setup_fleet(store, n=2)
    rid = apply(store, rollout_doc(rel, strategy="all-at-once", soak="60s", health_timeout=120))
    tick(store, at(0))
    report(store, "web-00", at(1))
    tick(store, at(2))
    d = detail(store, rid, at(2))
    reasons = {m["id"]: (m["health"], m["reason"]) for m in d["batches"][0]["machines"]}
    assert reasons == {
        "web-00": ("pending", "soaking (1m)"),
        "web-01": ("pending", "no report since the batch started"),
    }
    tick(store, at(62))
    tick(store, at(120))
    d = detail(store, rid, at(120))
    reasons = {m["id"]: (m["health"], m["reason"]) for m in d["batches"][0]["machines"]}
    assert reasons["web-00"] == ("healthy", "healthy")
    assert reasons["web-01"] == (
        "unhealthy",
        "timed out after 2m (no report since the batch started)",
    )
    assert d["status"] == "paused"


def test_apply_is_idempotent_and_conflicts_are_named(any_store: AnyStore) -> None:
    store = any_store
    rel = setup_fleet(store)
    doc = rollout_doc(rel)
    rid = apply(store, doc)
    assert apply(store, json.loads(json.dumps(doc))) == rid  # the same document: no-op
    with store.read() as conn:
        assert conn.execute("SELECT COUNT(*) FROM rollouts").fetchone()[0] == 1
    with pytest.raises(ConflictError, match=r"web-rollout.*running with a different document"):
        apply(store, {**doc, "soak": 30})
    with pytest.raises(ConflictError, match=r"10 machine\(s\).*web-00 \(web-rollout\)"):
        apply(store, {**doc, "name": "other"})
    with store.transaction() as conn, pytest.raises(ConflictError, match="referenced by rollout"):
        releases.delete(conn, rel)
    with store.transaction() as conn:
        rollout_control.control(conn, rid, "cancel", "key:ops", at(1), HINT)
    tick(store, at(2))
    assert detail(store, rid, at(2))["status"] == "cancelled"
    assert machine(store, "web-00").desired_generation == gen("web-00", "o")  # left where it is
    other = apply(store, {**doc, "name": "other"}, at(3))
    assert other != rid


def test_rollouts_applied_at_one_time_are_ordered_as_applied(any_store: AnyStore) -> None:
    """One creation time (a GitOps pass, a fixed clock): newest is the one applied last,
    by name too (the order SQLite's rowid gave, which PostgreSQL has no twin of)."""
    store = any_store
    rel = setup_fleet(store)
    doc = rollout_doc(rel)
    first = apply(store, doc)
    with store.transaction() as conn:
        rollout_control.control(conn, first, "cancel", "key:ops", T0, HINT)
    second = apply(store, {**doc, "soak": 30})
    with store.transaction() as conn:
        rollout_control.control(conn, second, "cancel", "key:ops", T0, HINT)
    third = apply(store, {**doc, "name": "other"})
    with store.read() as conn:
        assert store_rollouts.resolve(conn, "web-rollout") == second
        listed = [r.id for r in store_rollouts.list_rollouts(conn)]
        cancelled = [r.id for r in store_rollouts.list_rollouts(conn, "cancelled")]
    assert listed == [third, second, first]
    assert cancelled == [second, first]


def test_skipped_hosts_and_empty_targets(any_store: AnyStore) -> None:
    store = any_store
    rel = setup_fleet(store, n=4, release_hosts=3)
    doc = rollout_doc(
        rel, target={"tags": ["web"], "hosts": ["ghost"]}, strategy="canary", batches=[1]
    )
    with store.read() as conn:
        plan, _ = planning.make_plan(conn, planning.spec_of(doc))
    assert list(plan.batches) == [("web-00",), ("web-01", "web-02")]
    assert {(s.hostname, s.reason) for s in plan.skipped} == {
        ("ghost", "not registered with the control plane"),
        ("web-03", f"no entry in release {rel}"),
    }
    with pytest.raises(ValidationError, match="targets no machine"):
        apply(store, rollout_doc(rel, target={"hosts": ["ghost"]}))
    with pytest.raises(NotFoundError):
        apply(store, rollout_doc("rel-000000000000"))
    rid = apply(store, doc)
    assert [s["hostname"] for s in detail(store, rid, T0)["skipped"]] == ["ghost", "web-03"]


def test_manual_pause_stops_new_batches(any_store: AnyStore) -> None:
    store = any_store
    rel = setup_fleet(store)
    rid = apply(store, rollout_doc(rel))
    tick(store, at(0))
    report(store, "web-00", at(1))
    with store.transaction() as conn:
        rollout_control.control(conn, rid, "pause", "key:ops", at(2), HINT)
        with pytest.raises(ConflictError, match="cannot pause"):
            rollout_control.control(conn, rid, "pause", "key:ops", at(2), HINT)
    tick(store, at(3))
    d = detail(store, rid, at(3))
    assert [b["status"] for b in d["batches"]] == ["deploying", "pending", "pending"]
    with store.transaction() as conn:
        rollout_control.control(conn, rid, "resume", "key:ops", at(4), HINT)
    # Only reports after the resume count: web-00 must report again.
    tick(store, at(5))
    assert detail(store, rid, at(5))["batches"][0]["status"] == "deploying"
    report(store, "web-00", at(6))
    tick(store, at(7))
    assert detail(store, rid, at(7))["batches"][1]["status"] == "deploying"


def test_revert_restores_desired_set_after_apply_before_the_batch_started(
    any_store: AnyStore,
) -> None:
    """The previous desired generation is the one a machine had when its batch started."""
    store = any_store
    rel = setup_fleet(store)
    rid = apply(store, rollout_doc(rel, on_failure="revert"))
    with store.transaction() as conn:  # batch 3 (web-04..09) has not started yet
        machines.set_desired(conn, "web-05", gen("web-05", "p"), "https://pin/", "operator", T0)
    t = drive(store, rid, 0, fail={"web-06"})
    assert detail(store, rid, at(t))["status"] == "failed"
    m = machine(store, "web-05")
    assert (m.desired_generation, m.desired_cache_url, m.desired_source) == (
        gen("web-05", "p"),
        "https://pin/",
        "operator",
    )
    assert machine(store, "web-00").desired_generation == gen("web-00", "o")


# --- bounded ticks: a batch larger than the tick's limit -------------------------------


def new_desired(store: AnyStore) -> int:
    with store.read() as conn:
        return int(
            conn.execute(
                "SELECT COUNT(*) FROM machines WHERE desired_source = 'rollout:web-rollout'"
            ).fetchone()[0]
        )


def healthy(store: AnyStore, rid: str) -> int:
    with store.read() as conn:
        return int(
            conn.execute(
                "SELECT COUNT(*) FROM rollout_machines WHERE rollout_id = ? AND health = 'healthy'",
                (rid,),
            ).fetchone()[0]
        )


def all_at_once(release: str, **kw: Any) -> dict[str, Any]:
    doc = rollout_doc(release, strategy="all-at-once", **kw)
    del doc["batches"]
    return doc


def test_a_batch_larger_than_the_limit_starts_and_is_judged_over_several_ticks(
    any_store: AnyStore,
) -> None:
    store = any_store
    rel = setup_fleet(store)
    rid = apply(store, all_at_once(rel))
    # Desired generations: 3 machines per tick, in position order, nothing judged meanwhile.
    written = []
    for i in range(5):
        reconciler.tick(store, HINT, at(i), limit=3)
        written.append(new_desired(store))
    assert written == [3, 6, 9, 10, 10]
    hosts = [m["id"] for m in detail(store, rid, at(5))["batches"][0]["machines"]]
    assert machine(store, hosts[0]).desired_generation == gen(hosts[0])
    for h in hosts:
        report(store, h, at(6))
    # Judged a window of 3 positions per tick, going round: the fifth tick above
    # already judged positions 0-2 (nobody had reported), so judging goes on with
    # 3-5, 6-8, 9 and then 0-2 again. Done only once every machine is judged.
    judged = []
    for i in range(5):
        reconciler.tick(store, HINT, at(7 + i), limit=3)
        judged.append((healthy(store, rid), detail(store, rid, at(7 + i))["status"]))
    assert judged == [
        (3, "running"),
        (6, "running"),
        (7, "running"),
        (10, "completed"),
        (10, "completed"),
    ]


def test_a_failing_window_fails_the_batch_and_the_revert_continues_over_ticks(
    any_store: AnyStore,
) -> None:
    store = any_store
    rel = setup_fleet(store)
    rid = apply(store, all_at_once(rel, on_failure="revert"))
    for i in range(4):
        reconciler.tick(store, HINT, at(i), limit=3)
    assert new_desired(store) == 10
    for i in range(10):
        report(store, f"web-{i:02}", at(5), ok=i != 8)
    # web-08 sits in the third window: the batch fails when that window is judged.
    statuses = []
    for i in range(3):
        reconciler.tick(store, HINT, at(6 + i), limit=3)
        statuses.append(detail(store, rid, at(6 + i))["status"])
    assert statuses == ["running", "running", "failed"]
    # The decision's tick had no budget left; the revert goes on, 3 machines a tick.
    restored = []
    for i in range(5):
        reconciler.tick(store, HINT, at(9 + i), limit=3)
        restored.append(10 - new_desired(store))
    assert restored == [3, 6, 9, 10, 10]
    for i in range(10):
        h = f"web-{i:02}"
        assert machine(store, h).desired_generation == gen(h, "o"), h
    with store.read() as conn:
        assert conn.execute("SELECT revert_after FROM rollouts").fetchone()[0] is None


def test_each_desired_change_of_a_rollout_is_one_history_event(any_store: AnyStore) -> None:
    """Chunked starts, a requeued batch and a chunked revert: one event per real change."""
    store = any_store
    rel = setup_fleet(store)
    with store.transaction() as conn:  # one machine had no desired generation at all
        machines.set_desired(conn, "web-01", None, None, None, T0)
    rid = apply(store, all_at_once(rel, on_failure="pause"))
    for i in range(4):
        reconciler.tick(store, HINT, at(i), limit=3)
    for i in range(10):
        report(store, f"web-{i:02}", at(5), ok=i != 8)
    for i in range(4):
        reconciler.tick(store, HINT, at(6 + i), limit=3)
    assert detail(store, rid, at(9))["status"] == "paused"
    with store.transaction() as conn:  # resume: the batch starts again, nothing changes
        rollout_control.control(conn, "web-rollout", "resume", "key:ops", at(10), HINT)
    for i in range(4):
        reconciler.tick(store, HINT, at(11 + i), limit=3)
    with store.read() as conn:
        # setup: 10 set + 1 clear; the rollout: 10, once although the batch started twice
        desired = sum(
            len(history.page(conn, f"web-{i:02}", kinds=[EventKind.DESIRED]).events)
            for i in range(10)
        )
    assert desired == 21
    with store.read() as conn:
        got = [
            (e.source, e.previous, e.generation)
            for e in history.page(conn, "web-01", kinds=[EventKind.DESIRED]).events
        ]
    assert got == [
        ("operator", None, gen("web-01", "o")),
        ("operator", gen("web-01", "o"), None),
        ("rollout:web-rollout", None, gen("web-01")),
    ]


def test_a_revert_over_ticks_writes_each_machines_desired_event_back(any_store: AnyStore) -> None:
    store = any_store
    rel = setup_fleet(store)
    with store.transaction() as conn:
        machines.set_desired(conn, "web-01", None, None, None, T0)
    rid = apply(store, all_at_once(rel, on_failure="revert"))
    for i in range(4):
        reconciler.tick(store, HINT, at(i), limit=3)
    for i in range(10):
        report(store, f"web-{i:02}", at(5), ok=i != 8)
    for i in range(8):
        reconciler.tick(store, HINT, at(6 + i), limit=3)
    assert detail(store, rid, at(14))["status"] == "failed"
    with store.read() as conn:
        for i in range(10):
            h = f"web-{i:02}"
            got = [
                (e.source, e.previous, e.generation)
                for e in history.page(conn, h, kinds=[EventKind.DESIRED]).events
            ]
            old = None if h == "web-01" else gen(h, "o")
            assert got[-2:] == [
                ("rollout:web-rollout", old, gen(h)),
                ("operator", gen(h), old),
            ], h


def test_batches_started_before_the_bounded_ticks_migration_are_not_rewritten(
    tmp_path: Path,
) -> None:
    """A rollout written by 0005-era code, in that era's SQL: today's writers expect
    today's schema, so they cannot make the old world."""
    path, at = tmp_path / "old.db", "2026-11-27T10:00:00Z"
    hosts = [f"web-{i:02}" for i in range(10)]
    batches = [(0, 1, "deploying", at), (1, 3, "pending", None)]
    batches.append((2, 6, "pending", None))
    spans = [(0, 0), (1, 1), (2, 1), (3, 1)] + [(p, 2) for p in range(4, 10)]
    with store_before(path, "0006") as s, s.transaction() as conn:
        conn.executemany(
            "INSERT INTO machines (id, lifecycle, registered_at) VALUES (?, 'active', ?)",
            [(h, at) for h in hosts],
        )
        conn.execute(
            "INSERT INTO releases (id, created_at, created_by) VALUES ('rel', ?, 'test')", (at,)
        )
        conn.execute(
            "INSERT INTO rollouts (id, name, release_id, status, document_json, document_hash,"
            " source, created_at, created_by, updated_at) VALUES ('r1', 'web', 'rel',"
            " 'running', '{}', 'h', 'api', ?, 'test', ?)",
            (at, at),
        )
        conn.executemany(
            "INSERT INTO rollout_batches (rollout_id, idx, size, status, started_at)"
            " VALUES ('r1', ?, ?, ?, ?)",
            batches,
        )
        conn.executemany(
            "INSERT INTO rollout_machines (rollout_id, machine_id, batch_idx, position,"
            " store_path) VALUES ('r1', ?, ?, ?, ?)",
            [(hosts[p], b, p, gen(hosts[p])) for p, b in spans],
        )
    s = Store(path)
    with s.read() as conn:
        rows = conn.execute(
            "SELECT idx, started_until, judged_until FROM rollout_batches ORDER BY idx"
        ).fetchall()
    assert [tuple(r) for r in rows] == [(0, 0, None), (1, None, None), (2, None, None)]
    s.close()
