"""What every resource shares: the store, the settings and the process's in-memory views."""

from __future__ import annotations

from dataclasses import dataclass

from nixfleet.api.report_cache import ReportCache
from nixfleet.api.status_view import StatusView
from nixfleet.settings import Settings
from nixfleet.store.conn import AnyStore


@dataclass(frozen=True)
class Context:
    settings: Settings
    store: AnyStore
    cache: ReportCache | None = None  # the report path's memory (api.report_cache)
    status_view: StatusView | None = None  # the whole fleet's status (api.status_view)

    @property
    def limit(self) -> int:
        return self.settings.max_body_bytes
