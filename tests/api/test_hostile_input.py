"""Hostile input: every body-taking route and every id in a path answer 4xx, never 5xx,
and a refused request writes nothing (every table is compared before and after).

The routes come from the app's route table, so endpoints added later (rollouts,
releases) are attacked too; the property-based part runs with a fixed seed and a
bounded number of examples, so a failure reproduces exactly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import falcon.testing
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from security_helpers import (
    MUTATING,
    OWN,
    Seeded,
    concrete,
    dump,
    make_client,
    request,
    route_methods,
    seed,
)

from nixfleet import schemas
from nixfleet.api.auth import Perm
from nixfleet.store import Store

MIB = 1024 * 1024


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Store, falcon.testing.TestClient, Seeded]]:
    store = Store(tmp_path / "nixfleet.db")
    seeded = seed(store)
    yield store, make_client(store), seeded
    store.close()


def _secret(perm: Perm, seeded: Seeded) -> str | None:
    """A credential that gets past auth for this permission (on machine OWN)."""
    who = {
        Perm.PUBLIC: "none",
        Perm.AGENT: "agent-own",
        Perm.ENROLL: "enroll-token",
    }.get(perm, "admin")
    return seeded.secrets[who]


BODY_ROUTES = [
    (path, method, resource)
    for path, method, resource in route_methods()
    if method in MUTATING and method in getattr(resource, "schemas", {})
]
ID_ROUTES = [(p, m, r) for p, m, r in route_methods() if "{" in p]


def _ids(routes: list[tuple[str, str, Any]]) -> list[str]:
    return [f"{m} {p}" for p, m, _ in routes]


def _assert_refused(
    store: Store, before: dict[str, Any], resp: falcon.testing.Result, where: str
) -> None:
    assert 400 <= resp.status_code < 500, f"{where}: {resp.status} {resp.text[:300]}"
    assert resp.headers["content-type"] == "application/problem+json", where
    assert dump(store) == before, f"{where}: a refused request wrote to the database"


# --- raw bytes: the same attacks on every body-taking route -----------------------------

DEEP = b'{"a": ' * 10_000 + b"1" + b"}" * 10_000
ATTACKS: dict[str, tuple[bytes, str]] = {
    "huge body": (b'{"x": "' + b"a" * (MIB + 10) + b'"}', "application/json"),
    "deep nesting": (DEEP, "application/json"),
    "deep list": (b"[" * 100_000 + b"]" * 100_000, "application/json"),
    "huge integer": (b'{"current_generation": ' + b"9" * 5000 + b"}", "application/json"),
    "huge float": (b'{"id": 1e400, "uptime_seconds": 1e400}', "application/json"),
    "NaN": (b'{"uptime_seconds": NaN}', "application/json"),
    "Infinity": (b'{"uptime_seconds": -Infinity}', "application/json"),
    "duplicate keys": (b'{"id": "a", "id": "b", "lifecycle": "active"}', "application/json"),
    "invalid utf-8": (b'{"id": "\xff\xfe"}', "application/json"),
    "lone surrogate": (b'{"id": "\\ud800"}', "application/json"),
    "truncated": (b'{"id": "web-01"', "application/json"),
    "empty": (b"", "application/json"),
    "not an object": (b'"just a string"', "application/json"),
    "null": (b"null", "application/json"),
    "wrong content type": (b'{"id": "web-09"}', "text/plain"),
    "form encoded": (b"id=web-09", "application/x-www-form-urlencoded"),
    "no content type": (b'{"id": "web-09"}', ""),
    "control characters": (
        b'{"id": "web\\u0000-09", "machine_id": "a\\u001bb", "name": "\\u0007",'
        b' "tags": ["\\u0000"], "lifecycle": "\\u0000", "current_generation": "\\n"}',
        "application/json",
    ),
    "unknown fields": (b'{"__proto__": {"admin": true}, "constructor": 1}', "application/json"),
    # The compact form nixfleet's client sends takes a faster parse (api.body._compact).
    "compact deep nesting": (b'{"a":' * 40 + b"1" + b"}" * 40, "application/json"),
    "compact duplicate keys": (b'{"id":"a","id":"b","lifecycle":"active"}', "application/json"),
    "compact control characters": (
        b'{"id":"web\\u0000-09","machine_id":"a\\u001bb","tags":["\\u0000"],'
        b'"lifecycle":"\\u0000","current_generation":"\\n"}',
        "application/json",
    ),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
@pytest.mark.parametrize(("path", "method", "resource"), BODY_ROUTES, ids=_ids(BODY_ROUTES))
def test_hostile_bodies_are_refused(
    world: tuple[Store, falcon.testing.TestClient, Seeded],
    path: str,
    method: str,
    resource: type[Any],
    attack: str,
) -> None:
    store, client, seeded = world
    body, ctype = ATTACKS[attack]
    secret = _secret(resource.permissions[method], seeded)
    before = dump(store)
    resp = request(client, method, concrete(path), secret, body=body, content_type=ctype)
    _assert_refused(store, before, resp, f"{method} {path} with {attack}")


# --- hostile ids in paths ------------------------------------------------------------------

HOSTILE_IDS = [
    "..",
    "%2e%2e",
    "..%2f..%2fetc%2fpasswd",
    "%2e%2e%2f%2e%2e",
    "a%00b",
    "%00",
    "web-01%0a",
    "web%0d%0aSet-Cookie:x",
    "-leading-dash",
    ".hidden",
    "a" * 200,
    "%ff%fe",
    "w%C3%A9b",
    "web 01",
    "web-01;DROP TABLE machines",
]


@pytest.mark.parametrize("bad", HOSTILE_IDS)
@pytest.mark.parametrize(("path", "method", "resource"), ID_ROUTES, ids=_ids(ID_ROUTES))
def test_hostile_ids_are_refused(
    world: tuple[Store, falcon.testing.TestClient, Seeded],
    path: str,
    method: str,
    resource: type[Any],
    bad: str,
) -> None:
    store, client, seeded = world
    secret = _secret(resource.permissions[method], seeded)
    target = re.sub(r"\{\w+\}", lambda _: bad, path)
    before = dump(store)
    resp = request(client, method, target, secret)
    _assert_refused(store, before, resp, f"{method} {target}")


# --- property-based: random documents against every schema'd endpoint -----------------

JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.sampled_from([0, -1, 2**63, -(2**63) - 1, 10**18, 1.5, 1e300, -0.0])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
    | st.sampled_from(["", "../..", "\x00", "=1+1", "web-01", "/nix/store/x", "a" * 300])
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=20,
)


def _documents(schema_name: str) -> st.SearchStrategy[Any]:
    """Objects with the schema's own field names (so validation gets past the top level)
    holding hostile values, plus arbitrary JSON."""
    props = sorted(schemas.load(schema_name).get("properties", {}))
    keys = st.sampled_from(props) if props else st.text(max_size=10)
    near = st.dictionaries(keys | st.text(max_size=10), JSON_VALUES, max_size=len(props) + 2)
    return near | JSON_VALUES


@pytest.mark.parametrize(("path", "method", "resource"), BODY_ROUTES, ids=_ids(BODY_ROUTES))
def test_random_documents_never_5xx_nor_partial_write(
    world: tuple[Store, falcon.testing.TestClient, Seeded],
    path: str,
    method: str,
    resource: type[Any],
) -> None:
    store, client, seeded = world
    secret = _secret(resource.permissions[method], seeded)
    target = concrete(path)

    @settings(
        derandomize=True,
        max_examples=60,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(doc=_documents(resource.schemas[method]))
    def check(doc: Any) -> None:
        before = dump(store)
        body = json.dumps(doc).encode()
        resp = request(client, method, target, secret, body=body)
        where = f"{method} {path} with {body[:200]!r}"
        assert resp.status_code < 500, f"{where}: {resp.status} {resp.text[:300]}"
        if resp.status_code >= 400:
            assert dump(store) == before, f"{where}: refused but wrote"

    check()


def test_every_mutating_route_with_a_body_declares_a_schema() -> None:
    """A body the API reads without a schema would escape validation."""
    for path, method, resource in route_methods():
        if method in ("PUT", "PATCH"):
            assert method in getattr(resource, "schemas", {}), f"{method} {path}"
    assert {"report", "machine-register", "machine-lifecycle"} <= {
        r.schemas[m] for _, m, r in BODY_ROUTES
    }
    assert all(m in MUTATING for _, m, _ in BODY_ROUTES)
    assert OWN in concrete("/api/v1/machines/{machine_id}")


MUTATING_ROUTES = [(p, m, r) for p, m, r in route_methods() if m in MUTATING]


@pytest.mark.parametrize(("path", "method", "resource"), MUTATING_ROUTES, ids=_ids(MUTATING_ROUTES))
def test_a_route_reads_a_body_exactly_when_it_declares_a_schema(
    world: tuple[Store, falcon.testing.TestClient, Seeded], path: str, method: str, resource: Any
) -> None:
    """Every mutating route, sent a body that is not JSON: the routes that read it (a 400
    naming the JSON) are exactly those whose schema is declared, and so fuzzed above."""
    _, client, seeded = world
    secret = _secret(resource.permissions[method], seeded)
    resp = request(client, method, concrete(path), secret, body=b'{"truncated": ')
    assert resp.status_code < 500, f"{method} {path}: {resp.status} {resp.text[:300]}"
    reads = resp.status_code == 400 and "not valid JSON" in resp.text
    assert reads == (method in getattr(resource, "schemas", {})), f"{method} {path}: {resp.text}"
