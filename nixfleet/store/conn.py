"""What a store function needs of a connection, whichever the backend.

`sqlite3.Connection` is one as it is; `store.pg.PgConnection` wraps a psycopg
connection into one (placeholders translated, rows read by name and position).
A noun module typed with `Connection` runs on both backends, and `AnyStore` is
the store interface both offer (docs/scaling.md "PostgreSQL backend: design").
Where the dialects differ, the module that owns a query keeps both spellings side
by side and picks one with `is_postgresql(conn)`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol


class Row(Protocol):
    """A result row: by column name (DESIGN rule 9) or position (sqlite3.Row, pg.Row)."""

    def __getitem__(self, key: str | int, /) -> Any: ...


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    # `?` with a sequence, `:name` with a mapping: store.pg translates both.
    def execute(
        self, sql: str, parameters: Sequence[Any] | Mapping[str, Any] = ..., /
    ) -> Cursor: ...

    def executemany(
        self, sql: str, parameters: Iterable[Sequence[Any] | Mapping[str, Any]], /
    ) -> Any: ...


def is_postgresql(conn: Connection) -> bool:
    """Whether `conn` speaks PostgreSQL (a store.pg.PgConnection), not SQLite.

    One isinstance check, cheap enough for the report path; this module does not
    import psycopg (an optional dependency), hence the test on SQLite's side.
    """
    return not isinstance(conn, sqlite3.Connection)


class AnyStore(Protocol):
    """The store interface both backends offer (store.db.Store, store.pg.PgStore).

    What the API, the report cache and the background jobs use (docs/scaling.md
    "PostgreSQL backend: design"); what only SQLite has (checkpoint, backup) stays on
    store.db.Store.
    """

    def transaction(self) -> AbstractContextManager[Connection]: ...

    def read(self) -> AbstractContextManager[Connection]: ...

    def lookup(self) -> AbstractContextManager[Connection]: ...

    def migrate(self) -> list[str]: ...

    def applied_migrations(self) -> list[str]: ...

    def readiness(self) -> str | None: ...

    def ping(self) -> None: ...

    def published_changes(self) -> int | None:
        """The last change committed (None: the report cache cannot know, so it never serves)."""
        ...

    def changes_touch(self, applied: int, published: int, machine_id: str) -> bool:
        """Whether a change in (applied, published] may concern the machine."""
        ...

    def close(self) -> None: ...
