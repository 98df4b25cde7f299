"""The rollouts' explicit locks on PostgreSQL, two transactions at once.

SQLite's one writer runs an apply, an operator's pause and a reconciler tick one
after the other; on PostgreSQL `apply` takes locks.ROLLOUT_APPLY, and
rollout_control.control and ticks.to_visit lock the rollouts' rows. As in
test_pg_locks, a first transaction is held open while a second collides with it;
each test fails without its lock (the second would decide on what it read before
the first committed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from postgres_cluster import import_psycopg

from nixfleet.errors import ConflictError
from nixfleet.flake import release_from_document
from nixfleet.models import Lifecycle, RolloutStatus
from nixfleet.store import machines, releases, rollout_control, ticks
from nixfleet.store import rollouts as store_rollouts
from nixfleet.store.conn import Connection
from store.test_pg_locks import while_open

import_psycopg()

from nixfleet.store.pg import PgStore  # noqa: E402

T0 = datetime(2026, 11, 27, 9, 0, tzinfo=UTC)
HOSTS = [f"web-{i:02}" for i in range(4)]


@pytest.fixture
def pg(postgres_url: str) -> Iterator[PgStore]:
    store = PgStore(postgres_url, max_size=4)
    yield store
    store.close()


def setup(store: PgStore) -> dict[str, Any]:
    """Four machines, a release for them, and a rollout document over them."""
    with store.transaction() as conn:
        for h in HOSTS:
            machines.register(conn, h, ["web"], Lifecycle.ACTIVE, T0)
        rel = release_from_document(
            {
                "entries": [
                    {
                        "hostname": h,
                        "store_path": f"/nix/store/{'n' * 32}-nixos-system-{h}",
                        "platform": "x86_64-linux",
                    }
                    for h in HOSTS
                ]
            }
        )
        releases.insert(conn, rel, T0, "test")
    return {
        "version": 1,
        "name": "web",
        "release": rel.id,
        "target": {"tags": ["web"]},
        "strategy": "all-at-once",
    }


def apply(doc: dict[str, Any]) -> Callable[[Connection], store_rollouts.Applied]:
    def run(conn: Connection) -> store_rollouts.Applied:
        return store_rollouts.apply(conn, doc, "key:test", T0, 5)

    return run


def names(store: PgStore) -> list[tuple[str, str]]:
    with store.read() as conn:
        return [(r.name, r.status.value) for r in store_rollouts.list_rollouts(conn)]


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"name": "other"}, r"4 machine\(s\) already belong to an active rollout"),
        ({"soak": 30}, r"rollout 'web' is running with a different document"),
    ],
    ids=["other-name-same-machines", "same-name-other-document"],
)
def test_two_applies_at_once_are_one_rollout_and_a_conflict(
    pg: PgStore, change: dict[str, Any], error: str
) -> None:
    doc = setup(pg)
    with pytest.raises(ConflictError, match=error):
        while_open(pg, apply(doc), apply({**doc, **change}))
    assert names(pg) == [("web", "running")]


def test_the_same_document_twice_at_once_is_one_rollout(pg: PgStore) -> None:
    """Not a unique violation of rollouts.id: the second finds the first's row."""
    doc = setup(pg)
    waited, second = while_open(pg, apply(doc), apply(doc))
    assert waited and not second.created
    assert names(pg) == [("web", "running")]


def test_an_operator_s_pause_waits_for_a_tick_in_flight(pg: PgStore) -> None:
    """The tick completes the rollout; the pause then finds it completed (409), and
    does not write `paused` over `completed`."""
    doc = setup(pg)
    with pg.transaction() as conn:
        rid = store_rollouts.apply(conn, doc, "key:test", T0, 5).id

    def tick(conn: Connection) -> None:
        assert [r.id for r in ticks.to_visit(conn)] == [rid]
        ticks.set_rollout_status(conn, rid, RolloutStatus.COMPLETED, T0)

    def pause(conn: Connection) -> str:
        return rollout_control.control(conn, rid, "pause", "key:ops", T0, 5)

    with pytest.raises(ConflictError, match="cannot pause rollout 'web': it is completed"):
        while_open(pg, tick, pause)
    assert names(pg) == [("web", "completed")]


def test_a_tick_waits_for_an_operator_s_pause(pg: PgStore) -> None:
    """The tick visits what the pause committed: no rollout to run."""
    doc = setup(pg)
    with pg.transaction() as conn:
        rid = store_rollouts.apply(conn, doc, "key:test", T0, 5).id

    def pause(conn: Connection) -> str:
        return rollout_control.control(conn, rid, "pause", "key:ops", T0, 5)

    waited, visited = while_open(pg, pause, ticks.to_visit)
    assert waited and visited == []
    assert names(pg) == [("web", "paused")]
