"""The API's tests run on both backends: `store` here is `any_store` (tests/conftest.py)."""

from __future__ import annotations

import pytest

from nixfleet.store.conn import AnyStore


@pytest.fixture
def store(any_store: AnyStore) -> AnyStore:
    return any_store
