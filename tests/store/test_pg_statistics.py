"""The planner knows a new rollout's size before its first tick (PostgreSQL).

Autovacuum analyzes a table a minute or so after it changes; the reconciler's first
tick comes within seconds of `rollout apply`. With statistics that know only the
earlier rollouts, a new rollout id is estimated at one row, and at 100,000 machines
the batch start's per-machine look-up became a scan of the whole rollout per machine
(129 s for a 2,500-machine start; bench/pg_bench.py, docs/scaling.md). `apply`
analyzes rollout_machines in its transaction; this holds the estimate to the truth.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from postgres_cluster import import_psycopg

from nixfleet.store import rollout_control
from nixfleet.store import rollouts as store_rollouts
from store.test_rollout_locks import HOSTS, T0, setup

import_psycopg()

from nixfleet.store.pg import PgStore  # noqa: E402


@pytest.fixture
def pg(migrated_postgres_url: str) -> Iterator[PgStore]:
    store = PgStore(migrated_postgres_url, max_size=2)
    yield store
    store.close()


def estimated_rows(store: PgStore, rollout_id: str) -> int:
    with store.read() as conn:
        plan = conn.execute(
            "EXPLAIN (FORMAT JSON) SELECT * FROM rollout_machines WHERE rollout_id = ?",
            (rollout_id,),
        ).fetchone()[0]
    return int(plan[0]["Plan"]["Plan Rows"])


def test_a_new_rollout_is_estimated_at_its_size_not_one_row(pg: PgStore) -> None:
    doc = setup(pg)
    with pg.transaction() as conn:
        first = store_rollouts.apply(conn, doc, "key:test", T0, 5).id
        rollout_control.control(conn, first, "cancel", "key:test", T0, 5)
        conn.execute("ANALYZE rollout_machines")  # autovacuum's, once the first settled
    with pg.transaction() as conn:
        second = store_rollouts.apply(conn, {**doc, "name": "web-2"}, "key:test", T0, 5).id
    assert estimated_rows(pg, first) == len(HOSTS)
    # Without apply's ANALYZE: 1 (the statistics list only the first rollout's id).
    assert estimated_rows(pg, second) == len(HOSTS)
