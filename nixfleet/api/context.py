"""What every resource shares: the store and the settings."""

from __future__ import annotations

from dataclasses import dataclass

from nixfleet.settings import Settings
from nixfleet.store import Store


@dataclass(frozen=True)
class Context:
    settings: Settings
    store: Store

    @property
    def limit(self) -> int:
        return self.settings.max_body_bytes
