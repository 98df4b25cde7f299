"""Store fixtures: `any_store` runs a test on SQLite and on PostgreSQL alike."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from nixfleet.store import Store
from nixfleet.store.conn import AnyStore


@pytest.fixture(params=["sqlite", "postgresql"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AnyStore]:
    """A new, migrated store of each backend (the PostgreSQL one in a database of its own)."""
    if request.param == "sqlite":
        store: AnyStore = Store(tmp_path / "nixfleet.db")
    else:
        url = request.getfixturevalue("postgres_url")  # skips (or fails under CI) first
        from nixfleet.store.pg import PgStore

        store = PgStore(url, max_size=4)
    yield store
    store.close()
