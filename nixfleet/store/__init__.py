"""SQLite store: one file, WAL, named migrations, one module per noun."""

from nixfleet.store.db import Store

__all__ = ["Store"]
