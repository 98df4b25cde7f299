"""What every resource shares: the store, the settings and the report cache."""

from __future__ import annotations

from dataclasses import dataclass

from nixfleet.api.report_cache import ReportCache
from nixfleet.settings import Settings
from nixfleet.store.conn import AnyStore


@dataclass(frozen=True)
class Context:
    settings: Settings
    store: AnyStore
    cache: ReportCache | None = None  # the report path's memory (api.report_cache)

    @property
    def limit(self) -> int:
        return self.settings.max_body_bytes
