"""Deployment retention (store.retention, controlplane.retention) on both backends
(`any_store`): what is kept, what goes, that a second run changes nothing, and that
deletions go in bounded chunks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from nixfleet import reconciler
from nixfleet.api.rollouts import detail_json, listed_json
from nixfleet.cli import rollout as cli_rollout
from nixfleet.controlplane.retention import Pruned, prune_deployments
from nixfleet.errors import GoneError
from nixfleet.flake import release_from_document
from nixfleet.models import Lifecycle, MachineHealth, Release, Report
from nixfleet.settings import Settings
from nixfleet.store import machines, releases, retention, rollout_control
from nixfleet.store import rollouts as store_rollouts
from nixfleet.store.conn import AnyStore

T0 = datetime(2026, 9, 1, 10, 0, tzinfo=UTC)
DAYS = 14
SETTINGS = Settings(rollout_retention_days=DAYS)
HOSTS = [f"web-{i:02}" for i in range(10)]


def gen(host: str, salt: str) -> str:
    return f"/nix/store/{salt * 32}-nixos-system-{host}"


def at(days: float, seconds: float = 0) -> datetime:
    return T0 + timedelta(days=days, seconds=seconds)


def make_release(store: AnyStore, salt: str, when: datetime, hosts: list[str] = HOSTS) -> Release:
    doc = {
        "cache_url": "https://cache.example.com",
        "entries": [
            {"hostname": h, "store_path": gen(h, salt), "platform": "x86_64-linux", "tags": []}
            for h in hosts
        ],
    }
    rel = release_from_document(doc)
    with store.transaction() as conn:
        releases.insert(conn, rel, when, "test")
    return rel


def apply(store: AnyStore, name: str, release: str, when: datetime, **kw: Any) -> str:
    doc = {
        "version": 1,
        "name": name,
        "release": release,
        "target": {"tags": ["web"]},
        "strategy": "all-at-once",
        "health_timeout": "5m",
        "soak": 0,
        "failure_threshold": 2,
        **kw,
    }
    with store.transaction() as conn:
        return store_rollouts.apply(conn, doc, "key:test", when, 5).id


def deploy(store: AnyStore, name: str, rel: Release, when: datetime, failing: int = 1) -> str:
    """A rollout over the fleet that completes: `failing` machines report a failure."""
    rid = apply(store, name, rel.id, when)
    reconciler.tick(store, 5, when + timedelta(seconds=1))
    for k, e in enumerate(rel.entries):
        ok = k >= failing
        report = Report(
            e.hostname,
            when + timedelta(seconds=2),
            e.store_path if ok else gen(e.hostname, "o"),
            success=ok,
            message="deployed" if ok else "rolled back: nginx failed",
            attempted_generation=None if ok else e.store_path,
        )
        with store.transaction() as conn:
            machines.record_report(conn, report)
    for s in (3, 4, 5):
        reconciler.tick(store, 5, when + timedelta(seconds=s))
    with store.read() as conn:
        assert store_rollouts.detail(conn, rid, when).summary.status.value == "completed"
    return rid


@pytest.fixture
def fleet(any_store: AnyStore) -> AnyStore:
    with any_store.transaction() as conn:
        for h in HOSTS:
            machines.register(conn, h, ["web"], Lifecycle.ACTIVE, T0)
    return any_store


def count(store: AnyStore, table: str, where: str = "1 = 1", *params: object) -> int:
    with store.read() as conn:
        return int(
            conn.execute(f"SELECT COUNT(*) FROM {table} WHERE {where}", params).fetchone()[0]
        )


def snapshot(store: AnyStore) -> dict[str, list[tuple[Any, ...]]]:
    tables = ["rollouts", "rollout_batches", "rollout_machines", "rollout_events", "releases"]
    tables += ["release_entries", "audit"]
    with store.read() as conn:
        return {
            t: sorted((tuple(r) for r in conn.execute(f"SELECT * FROM {t}")), key=repr)
            for t in tables
        }


def test_a_finished_rollout_is_condensed_to_counts_and_its_unhealthy_machines(
    fleet: AnyStore, capsys: pytest.CaptureFixture[str]
) -> None:
    store = fleet
    old = deploy(store, "old", make_release(store, "a", at(0)), at(0))  # web-00 fails
    with store.read() as conn:
        before = detail_json(store_rollouts.detail(conn, old, at(0)))
        listed_before = [listed_json(r) for r in store_rollouts.list_rollouts(conn)]
    events = count(store, "rollout_events", "rollout_id = ?", old)
    audits = count(store, "audit")
    assert before["batches"][0]["counts"] == {"healthy": 9, "unhealthy": 1, "pending": 0}
    (failed,) = [m for m in before["batches"][0]["machines"] if m["health"] == "unhealthy"]
    assert failed["id"] == "web-00"

    # Within rollout_detail_hours of its end (at 3 s) it lists every machine.
    assert prune_deployments(SETTINGS, store, now=at(0, 3602)) == Pruned()
    assert count(store, "rollout_machines", "rollout_id = ?", old) == len(HOSTS)
    # Then it is condensed: the rows of the machines that ended healthy go.
    done = prune_deployments(SETTINGS, store, now=at(0, 3604))
    assert (done.rollouts, done.rollout_machines) == (1, len(HOSTS) - 1)
    assert count(store, "rollout_events", "rollout_id = ?", old) == events  # kept
    assert count(store, "audit") == audits  # kept (and nothing added)
    with store.read() as conn:
        after = detail_json(store_rollouts.detail(conn, old, at(0)))
        listed_after = [listed_json(r) for r in store_rollouts.list_rollouts(conn)]
    # What `rollout list` shows is unchanged but for the condensed time.
    assert [{**r, "machines_pruned_at": None} for r in listed_after] == listed_before
    assert listed_after[0]["machines_pruned_at"] == "2026-09-01T11:00:04.000000Z"
    # `rollout status`: the same summary, document, batches and counts; of the
    # machines, the one that failed, as it was listed before.
    assert [b["counts"] for b in after["batches"]] == [b["counts"] for b in before["batches"]]
    assert [b["machines"] for b in after["batches"]] == [[failed]]
    same = ("document", "events", "skipped", "status", "release", "name")
    assert {k: after[k] for k in same} == {k: before[k] for k in same}  # type: ignore[literal-required]
    for b1, b2 in zip(after["batches"], before["batches"], strict=True):
        assert {**b1, "machines": None} == {**b2, "machines": None}
    # The CLI says so, with the counts as before.
    cli_rollout.render(after)
    shown = capsys.readouterr().out
    assert "condensed at 2026-09-01T11:00:04.000000Z" in shown
    assert "(healthy 9, unhealthy 1)" in shown
    assert "web-00" in shown and "web-01" not in shown

    # rollout_retention_days after its last change the failed machine's row goes too.
    assert prune_deployments(SETTINGS, store, now=at(DAYS, 2)) == Pruned()
    assert prune_deployments(SETTINGS, store, now=at(DAYS, 4)) == Pruned(rollout_machines=1)
    with store.read() as conn:
        late = detail_json(store_rollouts.detail(conn, old, at(0)))
    assert [b["machines"] for b in late["batches"]] == [[]]
    assert [b["counts"] for b in late["batches"]] == [b["counts"] for b in before["batches"]]


def test_active_and_recent_rollouts_keep_their_machines(fleet: AnyStore) -> None:
    store = fleet
    rel = make_release(store, "a", at(0))
    paused = apply(store, "paused", rel.id, at(0), target={"hosts": HOSTS[:3]})
    with store.transaction() as conn:
        rollout_control.control(conn, paused, "pause", "key:test", at(0, 1), 5)
    running = apply(store, "running", rel.id, at(0), target={"hosts": HOSTS[3:6]})
    cancelled = apply(store, "cancelled", rel.id, at(0), target={"hosts": HOSTS[6:]})
    with store.transaction() as conn:  # finished, but it changed (cancel) recently
        rollout_control.control(conn, cancelled, "cancel", "key:test", at(DAYS, -1800), 5)
    assert prune_deployments(SETTINGS, store, now=at(DAYS)) == Pruned()
    assert count(store, "rollout_machines") == len(HOSTS)
    # An hour after the cancel, its (pending) rows go; the active ones stay, however old.
    done = prune_deployments(SETTINGS, store, now=at(DAYS, 1801))
    assert (done.rollouts, done.rollout_machines) == (1, 4)
    assert count(store, "rollout_machines", "rollout_id IN (?, ?)", paused, running) == 6
    assert prune_deployments(SETTINGS, store, now=at(3 * DAYS)) == Pruned()
    with store.read() as conn:
        listed = {r.name: r for r in store_rollouts.list_rollouts(conn)}
    assert listed["cancelled"].machines == {
        MachineHealth.PENDING: 4,
        MachineHealth.HEALTHY: 0,
        MachineHealth.UNHEALTHY: 0,
    }


def test_a_second_run_changes_nothing(fleet: AnyStore) -> None:
    store = fleet
    deploy(store, "a", make_release(store, "a", at(0)), at(0))
    deploy(store, "b", make_release(store, "b", at(1)), at(1))
    first = prune_deployments(SETTINGS, store, now=at(40))
    assert first.rollouts == 2 and first.releases == 1
    state = snapshot(store)
    assert prune_deployments(SETTINGS, store, now=at(40)) == Pruned()
    assert prune_deployments(SETTINGS, store, now=at(41)) == Pruned()
    assert snapshot(store) == state


def test_rows_go_in_bounded_chunks(fleet: AnyStore) -> None:
    store = fleet
    deploy(store, "a", make_release(store, "a", at(0)), at(0))
    make_release(store, "b", at(1))  # the machines run "a": "b" is unused
    with store.transaction() as conn:
        (rid,) = retention.finished_rollouts(conn, at(40))
        assert retention.condense_rollout(conn, rid, at(40))
        assert not retention.condense_rollout(conn, rid, at(40))  # once
    sizes = []
    while True:
        with store.transaction() as conn:
            n = retention.delete_rollout_machines(conn, 3, at(40 - DAYS))
        sizes.append(n)
        if not n:
            break
    assert sizes == [3, 3, 3, 1, 0]
    # Through the job: releases too, every transaction at most the chunk.
    done = prune_deployments(SETTINGS, store, chunk=4, now=at(40))
    assert done == Pruned(rollouts=0, rollout_machines=0, releases=1, release_entries=10)
    assert count(store, "release_entries") == len(HOSTS)  # "a" is what machines run


def test_releases_machines_need_stay_and_unused_ones_lose_their_entries(fleet: AnyStore) -> None:
    store = fleet
    a = make_release(store, "a", at(0))  # deployed, then superseded by b
    deploy(store, "a", a, at(0), failing=0)
    b = make_release(store, "b", at(1))
    deploy(store, "b", b, at(1), failing=0)  # every machine desires and runs b now
    never = make_release(store, "c", at(2))  # registered, never rolled out
    # d holds b's paths for half the hosts (their configs did not change) and new
    # ones for the others; it is newer, so for those hosts b is not needed.
    half = len(HOSTS) // 2
    d_doc = [(h, gen(h, "b") if i < half else gen(h, "d")) for i, h in enumerate(HOSTS)]
    d = release_from_document(
        {
            "entries": [
                {"hostname": h, "store_path": p, "platform": "x86_64-linux", "tags": []}
                for h, p in d_doc
            ]
        }
    )
    with store.transaction() as conn:
        releases.insert(conn, d, at(3), "test")
    young = make_release(store, "e", at(DAYS + 2))

    done = prune_deployments(SETTINGS, store, now=at(DAYS + 2.5))
    # a: old, its rollout finished long ago, nothing runs it -> pruned.
    # b: old, but the machines of the hosts d changed still desire and run it -> kept.
    # c: old, unused -> pruned. d: old, holds b's paths newer than b -> kept as well
    #    (machines desire those paths and d is their newest holder). e: young -> kept.
    assert done.releases == 2
    with store.read() as conn:
        listed = {r.id: r for r in releases.list_releases(conn)}
        assert listed[a.id].pruned_at is not None and listed[a.id].hosts == 0
        assert listed[never.id].pruned_at is not None
        assert [listed[r.id].pruned_at for r in (b, d, young)] == [None, None, None]
        assert listed[a.id].rollouts == 1  # its rollout still names it
        with pytest.raises(GoneError, match="register it again"):
            releases.get(conn, a.id)
    assert count(store, "release_entries", "release_id = ?", a.id) == 0
    # A rollout of a pruned release is refused, saying how to get it back.
    with pytest.raises(GoneError, match="pruned"):
        apply(store, "again", a.id, at(DAYS + 3))
    # Registering it again (its TOML file) restores its entries.
    with store.transaction() as conn:
        assert releases.insert(conn, a, at(DAYS + 3), "test")
        assert not releases.insert(conn, a, at(DAYS + 3), "test")
        assert releases.get(conn, a.id).entries == a.entries
    # When the hosts d changed get d's generation, b is no longer needed: b has a newer
    # holder (d) for the unchanged hosts.
    with store.transaction() as conn:
        for h, p in d_doc[half:]:
            machines.set_desired(conn, h, p, None, "operator", at(DAYS + 3))
            machines.record_report(conn, Report(h, at(DAYS + 3, 1), p))
    done = prune_deployments(SETTINGS, store, now=at(DAYS + 4))
    with store.read() as conn:
        listed = {r.id: r for r in releases.list_releases(conn)}
    assert listed[b.id].pruned_at is not None
    assert listed[d.id].pruned_at is None  # every machine runs one of its paths
    assert listed[a.id].pruned_at is not None  # restored, old and unused again


def test_a_release_an_active_or_recent_rollout_uses_stays(fleet: AnyStore) -> None:
    store = fleet
    a = make_release(store, "a", at(0))
    rid = apply(store, "slow", a.id, at(0))  # running for weeks
    assert prune_deployments(SETTINGS, store, now=at(DAYS + 5)).releases == 0
    with store.transaction() as conn:
        rollout_control.control(conn, rid, "cancel", "key:test", at(DAYS + 5), 5)
    # Cancelled within release_retention_days: kept (though nothing desires it: the
    # machines never switched); the rollout itself is condensed after an hour.
    done = prune_deployments(SETTINGS, store, now=at(DAYS + 5.5))
    assert (done.releases, done.rollouts) == (0, 1)
    done = prune_deployments(SETTINGS, store, now=at(DAYS + 6, 1))
    assert (done.releases, done.rollouts) == (1, 0)


def test_a_rolled_out_release_goes_a_day_after_its_rollout_a_staged_one_stays(
    fleet: AnyStore,
) -> None:
    store = fleet
    a = make_release(store, "a", at(0))
    deploy(store, "a", a, at(0), failing=0)  # its rollout's last change: at(0, 3)
    b = make_release(store, "b", at(0, 60))
    deploy(store, "b", b, at(0, 60), failing=0)  # the machines run b now
    staged = make_release(store, "c", at(0, 120))  # registered for later, never rolled out
    # Within release_retention_days of a's rollout: kept.
    assert prune_deployments(SETTINGS, store, now=at(1, 2)).releases == 0
    done = prune_deployments(SETTINGS, store, now=at(1, 4))
    assert done.releases == 1 and done.release_entries == len(HOSTS)
    with store.read() as conn:
        listed = {r.id: r.pruned_at for r in releases.list_releases(conn)}
    assert listed[a.id] is not None and listed[b.id] is None and listed[staged.id] is None
    # The staged one: rollout_retention_days after it was created; b: while it is used.
    assert prune_deployments(SETTINGS, store, now=at(DAYS, 119)).releases == 0
    assert prune_deployments(SETTINGS, store, now=at(DAYS, 121)).releases == 1
    with store.read() as conn:
        listed = {r.id: r.pruned_at for r in releases.list_releases(conn)}
    assert listed[staged.id] is not None and listed[b.id] is None
