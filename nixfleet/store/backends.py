"""`open_store`: the one place that turns a `database_url` into a store.

SQLite (`store.db.Store`) is the embedded default and needs nothing more; PostgreSQL
(`store.pg.PgStore`) needs the optional psycopg dependency, imported only here and
only when asked for, so an SQLite control plane never loads it.
"""

from __future__ import annotations

from nixfleet.database_url import DatabaseURL
from nixfleet.errors import ServiceError
from nixfleet.store.conn import AnyStore
from nixfleet.store.db import LOCK_TIMEOUT, Store


def open_store(
    database: DatabaseURL,
    *,
    init: bool = False,
    check: bool = False,
    lock_timeout: float = LOCK_TIMEOUT,
    connections: int = 8,
) -> AnyStore:
    """Open and migrate the database. `init` and `check` are SQLite's (an empty file
    accepted; quick_check first); `connections` sizes PostgreSQL's pool."""
    if database.path is not None:
        return Store(database.path, init=init, check=check, lock_timeout=lock_timeout)
    assert database.conninfo is not None
    try:
        from nixfleet.store.pg import PgStore
    except ImportError as e:
        raise ServiceError(
            f"database_url {database.display} needs the PostgreSQL driver ({e.name}); "
            "install nixfleet with its `postgresql` extra (psycopg, psycopg_pool)"
        ) from e
    return PgStore(database.conninfo, max_size=connections, timeout=lock_timeout)


def is_sqlite(store: AnyStore) -> bool:
    """Whether `store` is the embedded SQLite file (its own jobs: checkpoint, backup)."""
    return isinstance(store, Store)
