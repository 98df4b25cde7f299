"""Integer query parameters: one parser (api/params.py), a 422 naming the parameter and
its range on every endpoint that takes one, and the range in the OpenAPI document."""

from __future__ import annotations

import re
from pathlib import Path

import falcon.testing
import pytest

from nixfleet.api import create_app
from nixfleet.api.app import ROUTES
from nixfleet.api.openapi import document
from nixfleet.api.params import IntParam
from nixfleet.settings import Settings
from nixfleet.store import Store

ROOT = Path(__file__).resolve().parents[2]

# (path, parameter, least, most): every integer query parameter of the API.
PARAMS = [
    ("/api/v1/machines/web-01/history", "limit", 1, 1000),
    ("/api/v1/machines/web-01/history", "after", 0, 2**62),
    ("/api/v1/audit", "limit", 1, 10_000),
    ("/api/v1/webhooks/deliveries", "limit", 1, 1000),
    ("/api/v1/releases", "limit", 1, 10_000),
]

BAD = ["x", "-1", "1.5", " 7", "7 ", "", "1e3", "0x10", "\u0661", "9" * 400, "1,2"]


@pytest.fixture
def client(store: Store, admin_key: str) -> falcon.testing.TestClient:
    c = falcon.testing.TestClient(
        create_app(Settings(), store), headers={"Authorization": f"Bearer {admin_key}"}
    )
    r = c.simulate_post("/api/v1/machines", json={"id": "web-01"})
    assert r.status_code == 201, r.text
    return c


def _problem(r: falcon.testing.Result, name: str, low: int, high: int) -> None:
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json
    assert body["status"] == 422 and name in body["detail"]
    assert body["errors"] == [{"field": name, "message": f"an integer from {low} to {high}"}]


@pytest.mark.parametrize(("path", "name", "low", "high"), PARAMS)
def test_bad_integers_are_422_naming_the_parameter_and_its_range(
    client: falcon.testing.TestClient, path: str, name: str, low: int, high: int
) -> None:
    for value in [*BAD, str(low - 1), str(high + 1)]:
        if value == str(low - 1) and low == 0:
            continue  # "-1" is in BAD already
        r = client.simulate_get(path, params={name: value})
        _problem(r, name, low, high)
    # repeated with different values: which one was meant is unknowable
    r = client.simulate_get(path, query_string=f"{name}={low}&{name}={high}")
    _problem(r, name, low, high)


@pytest.mark.parametrize(("path", "name", "low", "high"), PARAMS)
def test_integers_in_range_are_taken(
    client: falcon.testing.TestClient, path: str, name: str, low: int, high: int
) -> None:
    for value in (low, high, max(low, 1)):
        r = client.simulate_get(path, params={name: str(value)})
        assert r.status_code == 200, r.text
    # the same value twice is that value
    r = client.simulate_get(path, query_string=f"{name}={high}&{name}={high}")
    assert r.status_code == 200, r.text


def test_the_limit_is_applied(client: falcon.testing.TestClient) -> None:
    for n in range(3):
        r = client.simulate_post("/api/v1/machines", json={"id": f"db-0{n}"})
        assert r.status_code == 201, r.text
    assert len(client.simulate_get("/api/v1/audit", params={"limit": "2"}).json["entries"]) == 2
    assert len(client.simulate_get("/api/v1/audit").json["entries"]) == 4  # default 100


def test_the_openapi_document_gives_each_integer_its_range() -> None:
    doc = document(ROUTES)
    found = set()
    for path, ops in doc["paths"].items():
        for op in ops.values():
            for p in op.get("parameters", []):
                if p["in"] == "query" and p["schema"]["type"] == "integer":
                    found.add((path, p["name"], p["schema"]["minimum"], p["schema"]["maximum"]))
                    assert "default" in p["schema"] and "an integer from" in p["description"]
    expected = {
        (re.sub(r"web-01", "{machine_id}", path), name, low, high)
        for path, name, low, high in PARAMS
    }
    assert found == expected


def test_no_other_integer_parser_in_the_api() -> None:
    """Falcon's get_param_as_int answers 400 with its own words: not in api/."""
    for f in sorted((ROOT / "nixfleet" / "api").glob("*.py")):
        text = f.read_text()
        assert "get_param_as_int" not in text, f
        assert ".isdigit()" not in text or f.name == "params.py", f


def test_every_query_integer_is_an_intparam() -> None:
    for _, resource in ROUTES:
        for declared in getattr(resource, "query", {}).values():
            for q in declared:
                assert isinstance(q, IntParam) or q[1] != "integer", (resource, q)
