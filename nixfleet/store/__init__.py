"""The store: SQLite (one file, WAL) or PostgreSQL; named migrations, one module per noun."""

from nixfleet.store.backends import open_store
from nixfleet.store.db import Store

__all__ = ["Store", "open_store"]
