"""Planning on both backends (`any_store`), in a read-only snapshot as the API plans:
the machines a spec targets (all its tags, plus its hosts), what is skipped
and why, and the targets that will not follow (decommissioned or stale).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from nixfleet.errors import NotFoundError, ValidationError
from nixfleet.flake import release_from_document
from nixfleet.models import Lifecycle, Report
from nixfleet.store import machines, planning, releases
from nixfleet.store.conn import AnyStore
from nixfleet.store.planning import TargetWarning

NOW = datetime(2026, 11, 27, 10, 0, 0, tzinfo=UTC)
STALE_AFTER = 300


def gen(host: str) -> str:
    return f"/nix/store/{'a' * 32}-nixos-system-{host}"


def setup(store: AnyStore) -> str:
    """web-00..03 tagged web (03 also canary), db-01 untagged, web-02 decommissioned,
    web-01 stale; the release has every host but web-03."""
    with store.transaction() as conn:
        for host, tags in [
            ("web-00", ["web"]),
            ("web-01", ["web"]),
            ("web-02", ["web"]),
            ("web-03", ["web", "canary"]),
            ("db-01", []),
        ]:
            machines.register(conn, host, tags, Lifecycle.PENDING, NOW)
            age = 3600 if host == "web-01" else 10
            machines.record_report(conn, Report(host, NOW - timedelta(seconds=age), gen(host)))
        machines.set_lifecycle(conn, "web-02", Lifecycle.DECOMMISSIONED)
        hosts = ["web-00", "web-01", "web-02", "db-01"]
        entries = [
            {"hostname": h, "store_path": gen(h), "platform": "x86_64-linux", "tags": []}
            for h in hosts
        ]
        rel = release_from_document({"entries": entries})
        releases.insert(conn, rel, NOW, "test")
    return rel.id


def doc(release: str, **kw: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "name": "web-rollout",
        "release": release,
        "target": {"tags": ["web"]},
        "strategy": "staged",
        "batches": [1, "100%"],
        "health_timeout": "5m",
        **kw,
    }


def test_a_plan_takes_the_tagged_machines_and_the_hosts(any_store: AnyStore) -> None:
    rel = setup(any_store)
    spec = planning.spec_of(
        doc(
            rel,
            target={"tags": ["web", "canary"], "hosts": ["db-01", "ghost", "web-02"]},
            skip_lifecycle=["decommissioned"],
        )
    )
    with any_store.read() as conn:
        plan, paths = planning.make_plan(conn, spec)
        every, _ = planning.make_plan(conn, planning.spec_of(doc(rel)))
    assert list(plan.batches) == [("db-01",)]
    assert {(s.hostname, s.reason) for s in plan.skipped} == {
        ("ghost", "not registered with the control plane"),
        ("web-02", "lifecycle decommissioned is in skip_lifecycle"),
        ("web-03", f"no entry in release {rel}"),
    }
    assert paths == {h: gen(h) for h in ("web-00", "web-01", "web-02", "db-01")}
    assert every.targets == ["web-00", "web-01", "web-02"]


def test_a_plan_needs_a_registered_release_id(any_store: AnyStore) -> None:
    setup(any_store)
    with any_store.read() as conn:
        with pytest.raises(NotFoundError):
            planning.make_plan(conn, planning.spec_of(doc("rel-000000000000")))
        with pytest.raises(ValidationError, match="release id, not a file"):
            planning.make_plan(conn, planning.spec_of(doc("releases/x.toml")))


def test_target_warnings_name_decommissioned_and_stale_targets(any_store: AnyStore) -> None:
    setup(any_store)
    hosts = ["web-03", "web-02", "web-01", "web-00", "ghost", "web-01"]
    with any_store.read() as conn:
        found = planning.target_warnings(conn, hosts, NOW, STALE_AFTER)
        assert planning.target_warnings(conn, [], NOW, STALE_AFTER) == []
        later = planning.target_warnings(conn, hosts, NOW + timedelta(hours=1), STALE_AFTER)
    assert found == [
        TargetWarning("web-01", "stale", NOW - timedelta(seconds=3600)),
        TargetWarning("web-02", "decommissioned", NOW - timedelta(seconds=10)),
    ]
    assert [(w.hostname, w.kind) for w in later] == [
        ("web-00", "stale"),
        ("web-01", "stale"),
        ("web-02", "decommissioned"),
        ("web-03", "stale"),
    ]
