"""Migrations on a database written by older code: tests/store/fixtures/schema-0007.db.

The fixture was made by the code of schema 0007 (make_0007.py beside it). Opening it
with today's store migrates it; nothing may be lost, and every read must still work.
"""

from __future__ import annotations

import shutil
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from nixfleet.models import TIME_FORMAT, isoformat, parse_time
from nixfleet.store import Store, machines, migrations, releases
from nixfleet.store import rollouts as store_rollouts

FIXTURE = Path(__file__).parent / "fixtures" / "schema-0007.db"


def _tables(path: Path) -> dict[str, list[tuple[object, ...]]]:
    conn = sqlite3.connect(path)
    try:
        names = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' "
                "AND name NOT LIKE 'sqlite_%' AND name <> 'schema_migrations' ORDER BY name"
            )
        ]
        return {n: conn.execute(f"SELECT * FROM {n} ORDER BY 1, 2").fetchall() for n in names}
    finally:
        conn.close()


@pytest.fixture
def old_db(tmp_path: Path) -> Path:
    target = tmp_path / "nixfleet.db"
    shutil.copyfile(FIXTURE, target)
    return target


def test_fixture_is_what_it_says(old_db: Path) -> None:
    conn = sqlite3.connect(old_db)
    names = [r[0] for r in conn.execute("SELECT name FROM schema_migrations ORDER BY name")]
    conn.close()
    assert names[-1] == "0007_machine_tags_json"
    short = [t for rows in _tables(old_db).values() for row in rows for t in row]
    assert any(isinstance(v, str) and len(v) == 20 and v.endswith("Z") for v in short)


def test_migrating_the_0007_fixture_loses_nothing_and_fixes_times(old_db: Path) -> None:
    before = _tables(old_db)
    store = Store(old_db)
    with store.read() as conn:
        applied = [r[0] for r in conn.execute("SELECT name FROM schema_migrations ORDER BY name")]
    store.close()
    assert applied == [name for name, _ in migrations.MIGRATIONS]
    after = _tables(old_db)
    assert {t: len(rows) for t, rows in after.items() if t in before} == {
        t: len(rows) for t, rows in before.items()
    }
    for table, rows in before.items():
        for old, new in zip(rows, after[table], strict=True):
            for a, b in zip(old, new, strict=False):
                if isinstance(a, str) and len(a) == 20 and a.endswith("Z") and a[10] == "T":
                    # the same instant, in the fixed form
                    assert b == isoformat(parse_time(a))
                    assert datetime.strptime(b, TIME_FORMAT).replace(tzinfo=UTC) == parse_time(a)
                else:
                    assert a == b, (table, old, new)


def test_a_migrated_database_reads_and_works(old_db: Path) -> None:
    store = Store(old_db)
    with store.read() as conn:
        fleet = machines.list_machines(conn)
        rid = store_rollouts.resolve(conn, "web-rollout")
        detail = store_rollouts.detail(conn, rid, datetime(2026, 11, 27, 11, tzinfo=UTC))
        listed = releases.list_releases(conn)
    assert detail.summary.status.value == "running" and len(detail.batches) == 2
    assert {m.id for m in fleet} == {"web-00", "web-01", "web-02", "web-03", "db-01", "gone-01"}
    assert len(listed) == 1
    with store.transaction() as conn:
        machines.set_tags(conn, "db-01", ["db", "new"], "operator", replace=True)
    with store.read() as conn:
        assert machines.get(conn, "db-01").tags == ("db", "new")
    store.close()
