"""GET /api/v1/status's document (store.status) is the same on both backends: one fleet
written into SQLite and into PostgreSQL gives, filter by filter and order by order, the
same parsed JSON and the same counts. And PostgreSQL's spelling of the host glob
(status.glob_regex) matches what SQLite's GLOB matches, pattern by pattern.
"""

from __future__ import annotations

import itertools
import json
import random
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from nixfleet.filters import SORT_KEYS, MachineFilter
from nixfleet.models import Health, HealthResult, Lifecycle, Report, Sync
from nixfleet.store import Store, machines, status
from nixfleet.store.conn import AnyStore

NOW = datetime(2026, 12, 2, 12, 0, 0, 500_000, tzinfo=UTC)
STALE_AFTER = 300
# Ids and tags whose byte order differs from a case-insensitive or natural one.
IDS = ["web-01", "Web-01", "web_01", "web.01", "web-1", "web-10", "web-9", "a", "Z9", "db-0"]
TAGS = ["prod", "Prod", "canary", "edge-1", "edge.1", "eu_west"]


def gen(host: str, salt: str) -> str:
    return f"/nix/store/{salt * 32}-nixos-system-{host}"


def fill(store: AnyStore) -> None:
    """The same fleet, written the same way, whichever the store."""
    rng = random.Random(11)
    hosts = [f"{base}{suffix}" for base in IDS for suffix in ("", "-x", ".y")]
    with store.transaction() as conn:
        for i, host in enumerate(hosts):
            lifecycle = list(Lifecycle)[i % len(Lifecycle)]
            machines.register(conn, host, rng.sample(TAGS, rng.randint(0, 3)), lifecycle, NOW)
            if i % 5 == 0:
                continue  # never reported
            if rng.random() < 0.5:
                machines.set_desired(conn, host, gen(host, "b"), None, "operator", NOW)
            ok = rng.random() < 0.7
            if lifecycle is not Lifecycle.DECOMMISSIONED:
                report = Report(
                    machine_id=host,
                    received_at=NOW - timedelta(seconds=rng.choice([5, 299, 300, 301, 9000])),
                    current_generation=gen(host, rng.choice("ab")),
                    success=ok,
                    attempted_generation=None if ok else gen(host, "b"),
                    health=rng.choice([None, HealthResult(True), HealthResult(False)]),
                    tags=tuple(rng.sample(TAGS, rng.randint(0, 2))),
                    message=rng.choice(["", "rolled back", 'quote " and \\ back', "é\tü ✓"]),
                )
                machines.record_report(conn, report)
            conn.execute(
                "UPDATE machines SET needs_reboot = ?, lifecycle = ? WHERE id = ?",
                ((None, 0, 1)[i % 3], lifecycle.value, host),
            )


@pytest.fixture
def both(store: Store, postgres_url: str) -> Iterator[tuple[AnyStore, AnyStore]]:
    from nixfleet.store.pg import PgStore

    pg = PgStore(postgres_url, max_size=2)
    try:
        fill(store)
        fill(pg)
        yield store, pg
    finally:
        pg.close()


FILTERS = [
    *(MachineFilter(sort=s, descending=d) for s, d in itertools.product(SORT_KEYS, (False, True))),
    MachineFilter(tags=("prod",)),
    MachineFilter(tags=("prod", "canary"), not_tags=("edge-1",)),
    MachineFilter(not_tags=("Prod", "eu_west")),
    MachineFilter(lifecycle=Lifecycle.ACTIVE, sort="last-report"),
    *(MachineFilter(sync=s) for s in Sync),
    *(MachineFilter(health=h, sort="sync", descending=True) for h in Health),
    MachineFilter(stale=True),
    MachineFilter(stale=False, sort="health"),
    MachineFilter(search="WEB"),
    MachineFilter(search="web-[0-9]*"),
    MachineFilter(search="[!a-z]*"),
    MachineFilter(search="*.?"),
    MachineFilter(search="web[", sort="lifecycle"),
]


@pytest.mark.parametrize("f", FILTERS)
def test_the_status_document_is_the_same_on_both_backends(
    both: tuple[AnyStore, AnyStore], f: MachineFilter
) -> None:
    docs = []
    for store in both:
        with store.read() as conn:
            doc = status.status_document(conn, f, NOW, STALE_AFTER)
        docs.append((json.loads(b"[" + doc.machines_json + b"]"), doc.counts))
    (sqlite_machines, sqlite_counts), (pg_machines, pg_counts) = docs
    assert pg_machines == sqlite_machines
    assert [list(m) for m in pg_machines] == [list(m) for m in sqlite_machines]
    assert pg_counts == sqlite_counts
    if f.search != "web[":  # an unclosed set matches nothing, on both
        assert sqlite_machines and sqlite_counts.selected == len(sqlite_machines)


def test_the_fleet_document_covers_every_case(both: tuple[AnyStore, AnyStore]) -> None:
    """The fleet above has each value the document can take, so the comparison can fail."""
    with both[1].read() as conn:
        doc = status.status_document(conn, MachineFilter(), NOW, STALE_AFTER)
    entries = json.loads(b"[" + doc.machines_json + b"]")
    assert {e["sync"] for e in entries} == {s.value for s in Sync}
    assert {e["health_status"] for e in entries} == {h.value for h in Health}
    assert {e["stale"] for e in entries} == {True, False}
    assert {e["needs_reboot"] for e in entries} == {None, False, True}
    assert {e["lifecycle"] for e in entries} == {life.value for life in Lifecycle}
    assert any(e["tags"] for e in entries) and any(not e["tags"] for e in entries)
    assert [e["id"] for e in entries] == sorted(e["id"] for e in entries)  # byte order


# Patterns around every rule of SQLite's GLOB sets, then random ones.
GLOBS = [
    "", "*", "?", "a*", "*a", "a?b", "**", "*?*", "[a]", "[]a]", "[^]a]", "[]-a]", "[a-c]",
    "[c-a]", "[a-]", "[-a]", "[a-c-e]", "[^a-c]", "[^^]", "[^]", "[]", "[", "[a", "a[]",
    "[z-a]", "[a--]", "[!-/]", "[\\]", "[[]", "[.]", "[*?]", "*[a-b]*", "[é-ë]", "€*",
    "^a", "a$", "(a)", "a+", "a{1}", "a|b", ".", "\\", "[[:alpha:]]", "[a-\\]",
]  # fmt: skip
ALPHABET = "ab-]^[*?.\\éëZ_!x"


def _random_globs(n: int) -> list[str]:
    rng = random.Random(3)
    return ["".join(rng.choices(ALPHABET, k=rng.randint(1, 7))) for _ in range(n)]


def _random_ids(n: int) -> list[str]:
    rng = random.Random(5)
    chars = "ab-]^[*?.\\éëZ_!x:/(+|$"
    return ["", *("".join(rng.choices(chars, k=rng.randint(1, 5))) for _ in range(n))]


def test_glob_regex_matches_what_sqlite_glob_matches(postgres_url: str) -> None:
    """SQLite's GLOB (an in-memory database) against PostgreSQL's `~` of glob_regex."""
    from nixfleet.store.pg import PgStore

    globs = GLOBS + _random_globs(600)
    ids = [*_random_ids(120), "a", "b", "ab", "]", "-", "^", "é", "ë", "ê", "€x", "\\", "c", "z"]
    lite = sqlite3.connect(":memory:")
    want = set(
        lite.execute(
            "SELECT p.key, s.key FROM json_each(?) p, json_each(?) s WHERE s.value GLOB p.value",
            (json.dumps(globs), json.dumps(ids)),
        )
    )
    lite.close()
    assert len(want) > 1000  # the patterns do match
    regexes = [status.glob_regex(g) for g in globs]  # None: matches nothing (NULL in SQL)
    never = {g for g, r in zip(globs, regexes, strict=True) if r is None}
    assert {"[", "[a", "a[]", "[]", "[^]"} <= never
    pg = PgStore(postgres_url, max_size=1)
    try:
        with pg.read() as conn:
            rows = conn.execute(
                "SELECT p.i, s.j FROM unnest(CAST(? AS TEXT[])) WITH ORDINALITY AS p(re, i), "
                "unnest(CAST(? AS TEXT[])) WITH ORDINALITY AS s(id, j) WHERE s.id ~ p.re",
                (regexes, ids),
            ).fetchall()
    finally:
        pg.close()
    assert {(int(i) - 1, int(j) - 1) for i, j in rows} == want
