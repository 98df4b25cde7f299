"""The request body's parse: the compact form nixfleet's client sends takes a faster
path (api.body._compact) that must decide exactly as the strict parse does."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nixfleet import client
from nixfleet.api import body
from nixfleet.errors import UsageError

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


def strict(raw: bytes) -> Any:
    return json.loads(raw, object_pairs_hook=body._no_duplicates)


@given(JSON)
def test_what_the_client_sends_parses_as_the_strict_parse_does(doc: Any) -> None:
    raw = client.encode(doc)
    assert body.parse_json(raw) == strict(raw) == doc


def test_an_agent_report_takes_the_compact_path() -> None:
    report = {
        "current_generation": "/nix/store/" + "a" * 32 + "-nixos-system-web-01-24.11",
        "tags": ["prod", "rack-1"],
        "success": True,
        "message": "switched · ok",  # not ASCII: sent as UTF-8, as orjson writes it
        "health": {"all_passed": True, "results": [{"name": "system", "passed": True}]},
        "agent_version": "0.1.0",
        "uptime_seconds": 86_402,
    }
    assert body._compact(client.encode(report)) == report
    assert body._compact(json.dumps(report).encode()) is None  # spaced: the strict parse


@pytest.mark.parametrize(
    "raw",
    [
        b'{"id":"a","id":"b"}',
        b'{"a":{"b":1,"b":2}}',
        b'[{"x":1,"x":1}]',
    ],
)
def test_a_duplicate_key_in_compact_form_is_refused(raw: bytes) -> None:
    assert body._compact(raw) is None
    with pytest.raises(UsageError, match="duplicate key"):
        body.parse_json(raw)


def test_compact_nesting_past_the_limit_is_refused() -> None:
    raw = b'{"a":' * (body.MAX_DEPTH + 1) + b"1" + b"}" * (body.MAX_DEPTH + 1)
    assert body._compact(raw) is not None
    with pytest.raises(UsageError, match="nested deeper"):
        body.parse_json(raw)


def test_a_lone_surrogate_is_sent_escaped_and_refused_by_the_strict_parse() -> None:
    raw = client.encode({"message": "bad \udcff byte"})  # what argv holds for a non-UTF-8 byte
    assert raw == b'{"message":"bad \\udcff byte"}'
    assert body._compact(raw) is None
