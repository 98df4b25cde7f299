"""Machines on both backends (`any_store`): registering, tags, lifecycle, desired
generations, listing. Then the SQL forms of sync and stale (store.status, one spelling
for both backends) agree with models, case by case, on each backend.

The cases are generated: every combination of desired, current and failed generation
from a small alphabet (None included), and report times on and around the stale
cutoff (a zero fraction included, the old trap of comparing stored strings).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta

import pytest

from nixfleet.errors import ConflictError, NotFoundError, ValidationError
from nixfleet.models import (
    Lifecycle,
    counts_in_sync_summary,
    is_stale,
    isoformat,
    stale_cutoff,
    sync_of,
)
from nixfleet.store import Store, machines
from nixfleet.store.conn import AnyStore
from nixfleet.store.status import STALE_SQL, SUMMARY_SQL, SYNC_SQL

A, B = "/nix/store/" + "a" * 32 + "-a", "/nix/store/" + "b" * 32 + "-b"
GENERATIONS = (None, A, B)
NOW = datetime(2026, 11, 27, 10, 0, 0, tzinfo=UTC)
STALE_AFTER = 300


def test_machines_are_registered_listed_and_got(any_store: AnyStore) -> None:
    with any_store.transaction() as conn:
        machines.register(conn, "web-02", ["prod", "web"], Lifecycle.PENDING, NOW)
        machines.register(conn, "db-01", ["prod"], Lifecycle.ACTIVE, NOW)
        machines.register(conn, "web-01.example.org", [], Lifecycle.ACTIVE, NOW)
    with pytest.raises(ConflictError), any_store.transaction() as conn:
        machines.register(conn, "db-01", [], Lifecycle.ACTIVE, NOW)
    with any_store.read() as conn:
        assert machines.machine_ids(conn) == ["db-01", "web-01.example.org", "web-02"]
        assert machines.machine_ids(conn, ["prod", "web"]) == ["web-02"]
        assert machines.machine_ids(conn, ["prod"], "active") == ["db-01"]
        assert machines.count(conn) == 3
        listed = machines.list_machines(conn, ["prod"])
        got = machines.get(conn, "web-02")
        assert machines.find_lifecycle(conn, "nope") is None
        with pytest.raises(NotFoundError):
            machines.get(conn, "nope")
    assert [m.id for m in listed] == ["db-01", "web-02"]
    assert got == listed[1]
    assert got.lifecycle is Lifecycle.PENDING and got.registered_at == NOW
    assert got.tags == got.operator_tags == ("prod", "web") and got.agent_tags == ()
    assert got.desired_generation is None and got.last_report_at is None


def test_tags_of_each_source_are_kept_apart(any_store: AnyStore) -> None:
    with any_store.transaction() as conn:
        machines.register(conn, "web-01", ["web"], Lifecycle.ACTIVE, NOW)
        assert machines.set_tags(conn, "web-01", ["eu", "web"], "agent", replace=True) == (
            ["eu", "web"],
            [],
        )
        assert machines.set_tags(conn, "web-01", ["eu"], "agent", replace=True) == ([], ["web"])
        assert machines.set_tags(conn, "web-01", ["canary"], "operator", replace=False) == (
            ["canary"],
            [],
        )
        assert machines.remove_tags(conn, "web-01", ["web", "absent"]) == ["web"]
    with any_store.read() as conn:
        m = machines.get(conn, "web-01")
        assert machines.machine_ids(conn, ["eu", "canary"]) == ["web-01"]
    assert (m.agent_tags, m.operator_tags, m.tags) == (("eu",), ("canary",), ("canary", "eu"))
    too_many = [f"t{i}" for i in range(machines.MAX_TAGS_PER_SOURCE + 1)]
    with pytest.raises(ValidationError), any_store.transaction() as conn:
        machines.set_tags(conn, "web-01", too_many, "operator", replace=True)


def test_lifecycle_desired_generation_and_retry(any_store: AnyStore) -> None:
    with any_store.transaction() as conn:
        machines.register(conn, "web-01", [], Lifecycle.ACTIVE, NOW)
        assert machines.set_lifecycle(conn, "web-01", Lifecycle.MAINTENANCE) is Lifecycle.ACTIVE
        machines.set_desired(conn, "web-01", A, "https://cache", "rollout:r1", NOW)
        machines.request_retry(conn, "web-01", NOW)
    with pytest.raises(ConflictError), any_store.transaction() as conn:
        machines.set_lifecycle(conn, "web-01", Lifecycle.PROVISIONING)
    with any_store.read() as conn:
        m = machines.get(conn, "web-01")
    assert m.lifecycle is Lifecycle.MAINTENANCE and m.retry_requested_at == NOW
    assert (m.desired_generation, m.desired_cache_url, m.desired_source) == (
        A,
        "https://cache",
        "rollout:r1",
    )
    with any_store.transaction() as conn:
        machines.set_desired(conn, "web-01", None, None, None, NOW)
    with any_store.read() as conn:
        assert machines.get(conn, "web-01").desired_generation is None
    with pytest.raises(NotFoundError), any_store.transaction() as conn:
        machines.set_desired(conn, "nope", A, None, None, NOW)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def expression_store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AnyStore]:
    """One store of each backend for all the expression cases below: they read no table,
    so a database per case (any_store) would only add its creation to each."""
    if request.param == "sqlite":
        sqlite = Store(tmp_path_factory.mktemp("expressions") / "nixfleet.db")
        yield sqlite
        sqlite.close()
        return
    from nixfleet.store.pg import PgStore

    server = request.getfixturevalue("postgres_server")  # skips (or fails under CI) first
    url = server.create_database()
    pg = PgStore(url, max_size=1)
    yield pg
    pg.close()
    server.drop_database(url)


def _sql(
    store: AnyStore, expression: str, columns: Mapping[str, object], *params: object
) -> object:
    # The expression's own parameters come first in the text, so they bind first.
    names = ", ".join(f"? AS {name}" for name in columns)
    with store.read() as conn:
        row = conn.execute(
            f"SELECT {expression} FROM (SELECT {names}) m", (*params, *columns.values())
        ).fetchone()
    return row[0]


@pytest.mark.parametrize(
    ("desired", "current", "failed"), list(itertools.product(GENERATIONS, repeat=3))
)
def test_sync_sql_is_sync_of(
    expression_store: AnyStore, desired: str | None, current: str | None, failed: str | None
) -> None:
    columns = {
        "desired_generation": desired,
        "current_generation": current,
        "failed_generation": failed,
    }
    assert _sql(expression_store, SYNC_SQL, columns) == sync_of(desired, current, failed).value


OFFSETS = [None] + [
    timedelta(seconds=s, microseconds=u) for s in (-301, -300, -299, 0) for u in (-1, 0, 1)
]


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("now", [NOW, NOW + timedelta(microseconds=500_000)])
@pytest.mark.parametrize("lifecycle", list(Lifecycle))
def test_stale_sql_is_is_stale(
    expression_store: AnyStore, offset: timedelta | None, now: datetime, lifecycle: Lifecycle
) -> None:
    last = None if offset is None else now + offset
    columns = {"last_report_at": isoformat(last), "lifecycle": lifecycle.value}
    cutoff = isoformat(stale_cutoff(now, STALE_AFTER))
    expected = is_stale(last, now, STALE_AFTER, lifecycle)
    assert bool(_sql(expression_store, STALE_SQL, columns, cutoff)) is expected


@pytest.mark.parametrize("lifecycle", list(Lifecycle))
def test_summary_sql_is_counts_in_sync_summary(
    expression_store: AnyStore, lifecycle: Lifecycle
) -> None:
    columns = {"lifecycle": lifecycle.value}
    assert bool(_sql(expression_store, SUMMARY_SQL, columns)) is counts_in_sync_summary(lifecycle)
