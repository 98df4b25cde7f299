"""The Falcon app over a real SQLite file: routes, error shapes, refusals that write nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import falcon
import falcon.inspect
import falcon.testing
import pytest
from security_helpers import dump

from nixfleet.api import create_app
from nixfleet.api.app import ROUTES
from nixfleet.settings import Settings
from nixfleet.store import Store

GEN = "/nix/store/" + "a" * 32 + "-nixos-system-web-01"
GEN2 = "/nix/store/" + "b" * 32 + "-nixos-system-web-01"


@pytest.fixture
def client(store: Store) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(create_app(Settings(max_body_bytes=4096), store))


@pytest.fixture
def admin(admin_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {admin_key}"}


@pytest.fixture
def web01(client: falcon.testing.TestClient, admin: dict[str, str]) -> str:
    r = client.simulate_post(
        "/api/v1/machines",
        json={"id": "web-01", "tags": ["prod"], "issue_token": True},
        headers=admin,
    )
    assert r.status_code == 201, r.text
    token: str = r.json["token"]
    return token


def agent(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_problem(
    r: falcon.testing.Result, status: int, field: str | None = None
) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = r.json
    assert set(body) >= {"type", "title", "status", "detail"}
    assert body["status"] == status and body["detail"]
    if field is not None:
        assert field in [e["field"] for e in body["errors"]], body
    return body


def test_health_and_metrics_are_public(client: falcon.testing.TestClient, web01: str) -> None:
    assert client.simulate_get("/health").json["status"] == "ok"
    text = client.simulate_get("/metrics").text
    assert 'nixfleet_machines{lifecycle="pending"} 1' in text


def test_report_round_trip(
    client: falcon.testing.TestClient, admin: dict[str, str], web01: str
) -> None:
    body = {
        "current_generation": GEN,
        "tags": ["web"],
        "success": True,
        "message": "deployed",
        "health": {
            "all_passed": True,
            "results": [{"name": "nginx", "kind": "systemd", "passed": True}],
        },
        "agent_version": "0.1.0",
        "uptime_seconds": 12,
    }
    r = client.simulate_post("/api/v1/machines/web-01/report", json=body, headers=agent(web01))
    assert r.status_code == 200, r.text
    assert r.json == {
        "desired_generation": None,
        "cache_url": None,
        "poll_hint": None,
        "retry_requested_at": None,
        "confirm_timeout": None,
    }
    r = client.simulate_put(
        "/api/v1/machines/web-01/desired-generation",
        json={"store_path": GEN2, "cache_url": "http://127.0.0.1:1/cache"},
        headers=admin,
    )
    assert r.json["sync"] == "updating"
    r = client.simulate_post(
        "/api/v1/machines/web-01/report", json={"current_generation": GEN}, headers=agent(web01)
    )
    assert (
        r.json["desired_generation"] == GEN2 and r.json["cache_url"] == "http://127.0.0.1:1/cache"
    )
    m = client.simulate_get("/api/v1/machines/web-01", headers=admin).json
    assert m["lifecycle"] == "active"
    assert m["tags"] == ["prod", "web"]  # operator tags plus agent tags
    assert m["current_generation"] == GEN
    # Its history ends with the changes: promoted by its first report, its generation.
    assert {"lifecycle", "generation"} <= {e["kind"] for e in m["history"]}
    r = client.simulate_get("/api/v1/machines/web-01/desired-generation", headers=agent(web01))
    assert r.json["desired_generation"] == GEN2
    client.simulate_delete("/api/v1/machines/web-01/desired-generation", headers=admin)
    assert (
        client.simulate_get("/api/v1/machines/web-01", headers=admin).json["sync"] == "no desired"
    )


def test_machine_list_filters(client: falcon.testing.TestClient, admin: dict[str, str]) -> None:
    for mid, tags in (("web-01", ["prod", "web"]), ("web-02", ["web"]), ("db-01", ["prod"])):
        client.simulate_post("/api/v1/machines", json={"id": mid, "tags": tags}, headers=admin)
    client.simulate_patch(
        "/api/v1/machines/db-01/lifecycle", json={"lifecycle": "provisioning"}, headers=admin
    )

    def ids(query: str) -> list[str]:
        r = client.simulate_get("/api/v1/machines", query_string=query, headers=admin)
        assert r.status_code == 200, r.text
        return [m["id"] for m in r.json["machines"]]

    assert ids("") == ["db-01", "web-01", "web-02"]
    assert ids("tag=prod&tag=web") == ["web-01"]
    assert ids("tag=prod,web") == ["web-01"]
    assert ids("tag=web") == ["web-01", "web-02"]
    assert ids("lifecycle=provisioning") == ["db-01"]
    assert ids("tag=prod&lifecycle=pending") == ["web-01"]
    assert_problem(
        client.simulate_get("/api/v1/machines", query_string="lifecycle=bogus", headers=admin),
        422,
        "lifecycle",
    )


def test_status_summary(
    client: falcon.testing.TestClient, admin: dict[str, str], web01: str
) -> None:
    client.simulate_post("/api/v1/machines", json={"id": "web-02"}, headers=admin)
    client.simulate_post(
        "/api/v1/machines/web-01/report", json={"current_generation": GEN}, headers=agent(web01)
    )
    client.simulate_put(
        "/api/v1/machines/web-01/desired-generation", json={"store_path": GEN}, headers=admin
    )
    data = client.simulate_get("/api/v1/status", headers=admin).json
    assert data["summary"]["total"] == 2 and data["summary"]["in_sync"] == 1
    assert data["summary"]["no_desired"] == 1
    assert data["summary"]["by_lifecycle"]["active"] == 1
    row = data["machines"][0]
    assert row["id"] == "web-01" and row["sync"] == "in sync" and row["stale"] is False
    assert row["last_report_at"].endswith("Z")


STATUS_FIELDS = (
    "id",
    "lifecycle",
    "current_generation",
    "desired_generation",
    "sync",
    "health_status",
    "failed_generation",
    "last_report_at",
    "stale",
    "system_state",
    "last_message",
    "needs_reboot",
    "tags",
)


def test_status_agrees_with_the_machine_list_under_every_filter(
    client: falcon.testing.TestClient, admin: dict[str, str], store: Store
) -> None:
    """GET /status is built by SQLite; GET /machines in Python from machine_tags: same facts."""
    from datetime import timedelta

    from nixfleet.models import Lifecycle, Report, utcnow
    from nixfleet.store import machines

    now = utcnow()
    with store.transaction() as conn:
        for i, (tags, life) in enumerate(
            [
                (["prod", "web"], Lifecycle.ACTIVE),
                (["web"], Lifecycle.ACTIVE),
                (["prod"], Lifecycle.MAINTENANCE),
                ([], Lifecycle.PENDING),
                (["db", "prod"], Lifecycle.ACTIVE),
            ]
        ):
            machines.register(conn, f"m-{i}", tags, life, now)
        # Reports: agent tags overlapping operator tags, non-ASCII text, a failure, a
        # report on the stale boundary and one well past it, a machine that never reported.
        cases = [
            ("m-0", now, GEN, True, 'ok ✓ «quoted» "x"', ("web", "eu")),
            ("m-1", now - timedelta(seconds=299), GEN2, True, "", ("web",)),
            ("m-2", now - timedelta(hours=2), GEN, False, "switch failed\nline 2", ()),
            ("m-4", now - timedelta(seconds=5), GEN, True, "", ("db", "zz")),
        ]
        for mid, at, gen, ok, msg, agent_tags in cases:
            machines.record_report(
                conn,
                Report(
                    machine_id=mid,
                    received_at=at,
                    current_generation=gen,
                    success=ok,
                    message=msg,
                    attempted_generation=None if ok else GEN2,
                    tags=agent_tags,
                ),
            )
        for mid in ("m-0", "m-2", "m-4"):
            machines.set_desired(conn, mid, GEN2 if mid == "m-2" else GEN, None, "operator", now)
        machines.set_tags(conn, "m-4", ["web"], "operator", replace=False)
        machines.remove_tags(conn, "m-4", ["db"])  # the agent still reports db
        machines.set_tags(conn, "m-4", [], "agent", replace=True)  # now it does not

    for query in (
        *("", "tag=prod", "tag=prod&tag=web", "tag=web", "lifecycle=active", "tag=none"),
        *("tag=prod,!web", "sync=failed", "sync=in-sync", "sync=no desired", "stale=true"),
        *("stale=false", "health=unknown", "host=m-*", "host=M-3", "sort=sync&dir=desc"),
        "sort=last-report",
    ):
        status = client.simulate_get("/api/v1/status", query_string=query, headers=admin)
        listed = client.simulate_get("/api/v1/machines", query_string=query, headers=admin)
        assert status.status_code == listed.status_code == 200, (status.text, listed.text)
        want = [{f: m[f] for f in STATUS_FIELDS} for m in listed.json["machines"]]
        assert status.json["machines"] == want, query
        summary = status.json["summary"]
        assert summary["total"] == len(want)
        for key, sync in (
            ("in_sync", "in sync"),
            ("updating", "updating"),
            ("failed", "failed"),
            ("no_desired", "no desired"),
        ):
            assert summary[key] == sum(m["sync"] == sync for m in want), (query, key)
        assert summary["stale"] == sum(m["stale"] for m in want)
        assert summary["by_lifecycle"] == {
            life.value: sum(m["lifecycle"] == life.value for m in want) for life in Lifecycle
        }
    every = client.simulate_get("/api/v1/status", headers=admin).json
    assert [m["stale"] for m in every["machines"]] == [False, False, True, False, False]
    assert every["machines"][4]["tags"] == ["prod", "web"]
    assert every["machines"][0]["tags"] == ["eu", "prod", "web"]


def test_lifecycle_conflict_names_states_and_targets(
    client: falcon.testing.TestClient, admin: dict[str, str], web01: str, store: Store
) -> None:
    before = dump(store)
    r = client.simulate_patch(
        "/api/v1/machines/web-01/lifecycle", json={"lifecycle": "maintenance"}, headers=admin
    )
    body = assert_problem(r, 409)
    assert "pending" in body["detail"] and "maintenance" in body["detail"]
    assert "active, decommissioned, provisioning" in body["detail"]
    assert dump(store) == before


def test_decommissioned_machine_gets_410_and_nothing_changes(
    client: falcon.testing.TestClient, admin: dict[str, str], store: Store
) -> None:
    r = client.simulate_post(
        "/api/v1/machines", json={"id": "old", "issue_token": True}, headers=admin
    )
    token = r.json["token"]
    client.simulate_patch(
        "/api/v1/machines/old/lifecycle", json={"lifecycle": "decommissioned"}, headers=admin
    )
    before = dump(store)
    r = client.simulate_post(
        "/api/v1/machines/old/report", json={"current_generation": GEN}, headers=agent(token)
    )
    # Decommissioning revokes the token, so the agent is refused before it can write.
    assert r.status_code in (401, 410)
    assert dump(store) == before


BAD_BODIES: list[tuple[str, str, str | bytes, str, int, str | None]] = [
    # (method, path, body, content-type, status, field)
    ("POST", "/api/v1/machines/web-01/report", b"{not json", "application/json", 400, None),
    (
        "POST",
        "/api/v1/machines/web-01/report",
        json.dumps({"current_generation": 42}),
        "application/json",
        422,
        "current_generation",
    ),
    (
        "POST",
        "/api/v1/machines/web-01/report",
        json.dumps({"current_generation": "/tmp/x"}),
        "application/json",
        422,
        "current_generation",
    ),
    (
        "POST",
        "/api/v1/machines/web-01/report",
        json.dumps({"current_generation": GEN, "bogus": 1}),
        "application/json",
        422,
        "bogus",
    ),
    (
        "POST",
        "/api/v1/machines/web-01/report",
        json.dumps({"current_generation": GEN, "tags": ["ok", "bad tag"]}),
        "application/json",
        422,
        "tags[1]",
    ),
    (
        "POST",
        "/api/v1/machines/web-01/report",
        json.dumps({"message": "no generation"}),
        "application/json",
        422,
        "current_generation",
    ),
    (
        "POST",
        "/api/v1/machines/web-01/report",
        json.dumps({"current_generation": GEN, "success": "yes"}),
        "application/json",
        422,
        "success",
    ),
    (
        "POST",
        "/api/v1/machines/web-01/report",
        '{"current_generation": "%s", "current_generation": "%s"}' % (GEN, GEN2),
        "application/json",
        400,
        "current_generation",
    ),
    (
        "POST",
        "/api/v1/machines/web-01/report",
        json.dumps({"current_generation": GEN}),
        "text/plain",
        415,
        None,
    ),
    (
        "POST",
        "/api/v1/machines/web-01/report",
        json.dumps({"current_generation": GEN, "message": "x" * 5000}),
        "application/json",
        413,
        None,
    ),
    (
        "POST",
        "/api/v1/machines/web-01/report",
        "[" * 100 + "]" * 100,
        "application/json",
        400,
        None,
    ),
    (
        "POST",
        "/api/v1/machines/web-01/report",
        '{"current_generation": NaN}',
        "application/json",
        400,
        None,
    ),
    ("POST", "/api/v1/machines/web-01/report", "", "application/json", 400, None),
    (
        "POST",
        "/api/v1/machines",
        json.dumps({"id": "../etc/passwd"}),
        "application/json",
        422,
        "id",
    ),
    (
        "POST",
        "/api/v1/machines",
        json.dumps({"id": "web-09", "lifecycle": "decommissioned"}),
        "application/json",
        422,
        "lifecycle",
    ),
    ("POST", "/api/v1/machines", json.dumps({"tags": ["x"]}), "application/json", 422, "id"),
    ("POST", "/api/v1/machines", json.dumps({"id": "web-01"}), "application/json", 409, None),
    (
        "PATCH",
        "/api/v1/machines/web-01/lifecycle",
        json.dumps({"lifecycle": "retired"}),
        "application/json",
        422,
        "lifecycle",
    ),
    (
        "PATCH",
        "/api/v1/machines/ghost/lifecycle",
        json.dumps({"lifecycle": "active"}),
        "application/json",
        404,
        None,
    ),
    (
        "PATCH",
        "/api/v1/machines/web-01/lifecycle",
        json.dumps({"lifecycle": "maintenance"}),  # pending -> maintenance: not allowed
        "application/json",
        409,
        None,
    ),
    (
        "POST",
        "/api/v1/machines/web-01/tags",
        json.dumps({"tags": []}),
        "application/json",
        422,
        "tags",
    ),
    (
        "PUT",
        "/api/v1/machines/web-01/desired-generation",
        json.dumps({"store_path": "nope"}),
        "application/json",
        422,
        "store_path",
    ),
    (
        "PUT",
        "/api/v1/machines/web-01/desired-generation",
        json.dumps({"store_path": GEN, "cache_url": "ftp://x"}),
        "application/json",
        422,
        "cache_url",
    ),
]


@pytest.mark.parametrize(("method", "path", "body", "ctype", "status", "field"), BAD_BODIES)
def test_bad_input_is_refused_and_writes_nothing(
    client: falcon.testing.TestClient,
    admin: dict[str, str],
    web01: str,
    store: Store,
    method: str,
    path: str,
    body: str | bytes,
    ctype: str,
    status: int,
    field: str | None,
) -> None:
    headers = agent(web01) if path.endswith("/report") else dict(admin)
    headers["Content-Type"] = ctype
    before = dump(store)
    r = client.simulate_request(method, path, body=body, headers=headers)
    assert_problem(r, status, field)
    assert dump(store) == before


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/api/v1/machines/ghost", 404),
        ("GET", "/api/v1/machines/bad%20id", 422),
        ("GET", "/api/v1/nowhere", 404),
        ("PUT", "/api/v1/status", 405),
        ("DELETE", "/api/v1/machines/ghost/desired-generation", 404),
        ("POST", "/api/v1/machines/ghost/retry", 404),
    ],
)
def test_other_error_paths_are_problem_json(
    client: falcon.testing.TestClient, admin: dict[str, str], method: str, path: str, status: int
) -> None:
    assert_problem(client.simulate_request(method, path, headers=admin), status)


def test_auth_errors_are_problem_json(client: falcon.testing.TestClient, web01: str) -> None:
    r = client.simulate_get("/api/v1/status")
    assert_problem(r, 401)
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert_problem(
        client.simulate_get("/api/v1/status", headers={"Authorization": "Bearer nfk_nope"}), 401
    )
    assert_problem(
        client.simulate_get("/api/v1/status", headers={"Authorization": "Basic abc"}), 401
    )
    assert_problem(client.simulate_get("/api/v1/status", headers=agent(web01)), 403)


def test_openapi_documents_exactly_the_routes_falcon_serves(
    client: falcon.testing.TestClient,
) -> None:
    doc = client.simulate_get("/api/v1/openapi.json").json
    assert doc["openapi"].startswith("3.1")
    served: set[tuple[str, str]] = set()
    for route in falcon.inspect.inspect_routes(client.app):
        if route.path.startswith("/ui"):
            continue  # the dashboard's HTML pages (nixfleet.ui), not API routes
        for method in route.methods:
            if method.internal:
                continue
            served.add((route.path, method.method.lower()))
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert served == documented
    assert {path for path, _ in ROUTES} == set(doc["paths"])
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert op["summary"] and op["summary"] != path, (method, path)
            assert "x-nixfleet-permission" in op


def test_openapi_request_schemas_resolve(client: falcon.testing.TestClient) -> None:
    doc = client.simulate_get("/api/v1/openapi.json").json
    components = doc["components"]["schemas"]

    def walk(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "$ref":
                    yield v
                else:
                    yield from walk(v)
        elif isinstance(node, list):
            for v in node:
                yield from walk(v)

    for ref in walk(doc):
        assert ref.startswith("#/components/schemas/"), ref
        node: Any = components
        for part in ref.removeprefix("#/components/schemas/").split("/"):
            node = node[part]
