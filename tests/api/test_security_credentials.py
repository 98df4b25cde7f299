"""API keys, machine tokens and enrollment, over the real app and a real SQLite store."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import falcon.testing
import pytest
from security_helpers import dump, make_client

from nixfleet.cli.config import read_secret_file
from nixfleet.errors import UsageError
from nixfleet.models import utcnow
from nixfleet.store import Store, credentials, enrollment

STORE_PATH = "/nix/store/" + "a" * 32 + "-nixos-system-web-01"


class Api:
    """A tiny wrapper: JSON in, (status, JSON) out, one bearer per call."""

    def __init__(self, client: falcon.testing.TestClient) -> None:
        self.client = client

    def __call__(
        self, method: str, path: str, secret: str | None, body: Any = None
    ) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"}
        if secret:
            headers["Authorization"] = f"Bearer {secret}"
        data = None if body is None else json.dumps(body).encode()
        if data is None and method != "GET":
            data = b"{}"
        r = self.client.simulate_request(method, path, headers=headers, body=data)
        return r.status_code, (json.loads(r.text) if r.text else None)


@pytest.fixture
def api(store: Store) -> Api:
    return Api(make_client(store))


def _register(api: Api, admin: str, machine_id: str, token: bool = True) -> str | None:
    status, m = api("POST", "/api/v1/machines", admin, {"id": machine_id, "issue_token": token})
    assert status == 201, m
    token = m.get("token")
    assert token is None or isinstance(token, str)
    return token


def _report(api: Api, machine_id: str, token: str | None) -> int:
    status, _ = api(
        "POST", f"/api/v1/machines/{machine_id}/report", token, {"current_generation": STORE_PATH}
    )
    return status


# --- operator keys ----------------------------------------------------------------------


def test_key_lifecycle_create_list_revoke(api: Api, admin_key: str, store: Store) -> None:
    status, created = api("POST", "/api/v1/keys", admin_key, {"name": "ci", "role": "deploy"})
    assert status == 201
    assert created["name"] == "ci" and created["role"] == "deploy"
    secret = created["key"]
    assert secret.startswith("nfk_") and len(secret) > 40
    # Stored hashed: the plaintext appears in no table.
    assert secret not in json.dumps(dump(store), default=str)
    assert credentials.digest(secret) in json.dumps(dump(store), default=str)

    status, listing = api("GET", "/api/v1/keys", admin_key)
    assert status == 200
    assert {k["name"]: k["role"] for k in listing["keys"]} == {
        "test-admin": "admin",
        "ci": "deploy",
    }
    assert secret not in json.dumps(listing)

    assert api("GET", "/api/v1/status", secret)[0] == 200
    status, revoked = api("DELETE", "/api/v1/keys/ci", admin_key)
    assert status == 200 and revoked["revoked_at"]
    assert api("GET", "/api/v1/status", secret)[0] == 401  # at once
    assert api("DELETE", "/api/v1/keys/ci", admin_key)[0] == 404  # already revoked
    assert [k["name"] for k in api("GET", "/api/v1/keys", admin_key)[1]["keys"]] == ["test-admin"]
    assert "ci" in [k["name"] for k in api("GET", "/api/v1/keys?all=true", admin_key)[1]["keys"]]


def test_revoked_key_name_can_be_reused_with_a_new_secret(api: Api, admin_key: str) -> None:
    first = api("POST", "/api/v1/keys", admin_key, {"name": "ci", "role": "deploy"})[1]["key"]
    assert api("POST", "/api/v1/keys", admin_key, {"name": "ci", "role": "deploy"})[0] == 409
    api("DELETE", "/api/v1/keys/ci", admin_key)
    status, again = api("POST", "/api/v1/keys", admin_key, {"name": "ci", "role": "readonly"})
    assert status == 201 and again["key"] != first
    assert api("GET", "/api/v1/status", first)[0] == 401
    assert api("GET", "/api/v1/status", again["key"])[0] == 200


def test_roles_nest_readonly_deploy_admin(api: Api, admin_key: str) -> None:
    _register(api, admin_key, "web-01", token=False)
    keys = {
        role: api("POST", "/api/v1/keys", admin_key, {"name": role, "role": role})[1]["key"]
        for role in ("readonly", "deploy")
    }
    desired = {"store_path": STORE_PATH}
    path = "/api/v1/machines/web-01/desired-generation"
    assert api("GET", "/api/v1/machines", keys["readonly"])[0] == 200
    assert api("PUT", path, keys["readonly"], desired)[0] == 403
    assert api("PUT", path, keys["deploy"], desired)[0] == 200
    assert api("PUT", path, admin_key, desired)[0] == 200
    assert api("POST", "/api/v1/machines", keys["deploy"], {"id": "web-02"})[0] == 403
    assert api("POST", "/api/v1/keys", keys["deploy"], {"name": "x", "role": "admin"})[0] == 403


def test_last_admin_key_cannot_be_revoked_over_the_network(api: Api, admin_key: str) -> None:
    status, problem = api("DELETE", "/api/v1/keys/test-admin", admin_key)
    assert status == 409 and "last active admin" in problem["detail"]
    second = api("POST", "/api/v1/keys", admin_key, {"name": "ops2", "role": "admin"})[1]["key"]
    assert api("DELETE", "/api/v1/keys/test-admin", second)[0] == 200
    assert api("GET", "/api/v1/keys", admin_key)[0] == 401


@pytest.mark.parametrize(
    "body",
    [
        {"name": "ci"},
        {"name": "ci", "role": "root"},
        {"name": "../etc", "role": "admin"},
        {"name": "a" * 65, "role": "admin"},
        {"name": "ci", "role": "admin", "key": "nfk_chosen-by-the-caller"},
    ],
)
def test_invalid_key_bodies_are_refused(
    api: Api, admin_key: str, store: Store, body: dict[str, Any]
) -> None:
    before = dump(store)
    status, problem = api("POST", "/api/v1/keys", admin_key, body)
    assert status == 422, problem
    assert dump(store) == before


def test_no_unauthenticated_route_creates_a_key(api: Api, store: Store) -> None:
    """The bootstrap rule: an empty database gets its first key only on the host."""
    for method, path in (("POST", "/api/v1/keys"), ("POST", "/api/v1/enroll-tokens")):
        status, _ = api(method, path, None, {"name": "ops", "role": "admin"})
        assert status == 401
    with store.read() as conn:
        assert credentials.list_keys(conn) == []


# --- machine tokens ----------------------------------------------------------------------


def test_machine_token_is_bound_to_its_machine(api: Api, admin_key: str) -> None:
    a = _register(api, admin_key, "web-a")
    b = _register(api, admin_key, "web-b")
    assert _report(api, "web-a", a) == 200
    assert _report(api, "web-b", a) == 403
    assert api("GET", "/api/v1/machines/web-b/desired-generation", a)[0] == 403
    assert api("GET", "/api/v1/machines/web-a/desired-generation", a)[0] == 200
    assert api("GET", "/api/v1/machines/web-a", a)[0] == 403  # operators' view, not agents'
    assert api("GET", "/api/v1/machines", b)[0] == 403


def test_rotate_token_kills_the_old_one_at_once(api: Api, admin_key: str) -> None:
    old = _register(api, admin_key, "web-a")
    assert _report(api, "web-a", old) == 200
    status, out = api("POST", "/api/v1/machines/web-a/token", admin_key)
    assert status == 201 and out["rotated"] is True and out["machine_id"] == "web-a"
    assert _report(api, "web-a", old) == 401
    assert _report(api, "web-a", out["token"]) == 200


def test_revoke_token_gives_401_and_decommission_410(api: Api, admin_key: str) -> None:
    a = _register(api, admin_key, "web-a")
    b = _register(api, admin_key, "web-b")
    status, out = api("DELETE", "/api/v1/machines/web-a/token", admin_key)
    assert status == 200 and out["revoked"] is True
    assert _report(api, "web-a", a) == 401
    api("PATCH", "/api/v1/machines/web-b/lifecycle", admin_key, {"lifecycle": "decommissioned"})
    assert _report(api, "web-b", b) == 410  # its agent is told why, and backs off
    assert api("POST", "/api/v1/machines/web-b/token", admin_key)[0] == 410
    assert api("POST", "/api/v1/machines/nope/token", admin_key)[0] == 404


# --- enrollment -------------------------------------------------------------------------


def _enroll_token(api: Api, admin: str, **body: Any) -> dict[str, Any]:
    status, out = api("POST", "/api/v1/enroll-tokens", admin, body)
    assert status == 201, out
    return dict(out)


def test_enrollment_registers_pending_machine_with_preset_tags(
    api: Api, admin_key: str, store: Store
) -> None:
    et = _enroll_token(api, admin_key, uses=2, tags=["prod", "web"], hostname_glob="web-*")
    assert et["token"].startswith("nfe_") and et["uses_left"] == 2 and et["state"] == "active"
    assert et["token"] not in json.dumps(dump(store), default=str)

    status, out = api(
        "POST",
        "/api/v1/enroll",
        None,
        {"enroll_token": et["token"], "machine_id": "web-07", "tags": ["nginx"]},
    )
    assert status == 201, out
    assert out["machine_id"] == "web-07" and out["token"].startswith("nfm_")
    m = api("GET", "/api/v1/machines/web-07", admin_key)[1]
    assert m["lifecycle"] == "pending"
    assert m["operator_tags"] == ["prod", "web"] and m["agent_tags"] == ["nginx"]
    assert _report(api, "web-07", out["token"]) == 200
    listed = api("GET", "/api/v1/enroll-tokens", admin_key)[1]["enroll_tokens"]
    assert [(t["id"], t["uses_left"]) for t in listed] == [(et["id"], 1)]
    assert et["token"] not in json.dumps(listed)
    entries = api("GET", f"/api/v1/audit?actor=enroll:{et['id']}", admin_key)[1]["entries"]
    assert [(e["action"], e["target"]) for e in entries] == [("machine.enroll", "web-07")]


def test_enrollment_token_as_bearer_with_id_alias(api: Api, admin_key: str) -> None:
    """The form the agent sends: the token as bearer, the machine as `id`."""
    et = _enroll_token(api, admin_key)
    status, out = api("POST", "/api/v1/enroll", et["token"], {"id": "db-01", "tags": []})
    assert status == 201 and out["machine_id"] == "db-01"


def test_enrollment_refusals(api: Api, admin_key: str, store: Store) -> None:
    one = _enroll_token(api, admin_key, uses=1, hostname_glob="web-*")
    body = {"enroll_token": one["token"]}
    # Hostname outside the glob: 403, and the use is not spent.
    before = dump(store)
    status, problem = api("POST", "/api/v1/enroll", None, {**body, "machine_id": "db-01"})
    assert status == 403 and "web-*" in problem["detail"]
    assert dump(store) == before
    assert api("POST", "/api/v1/enroll", None, {**body, "machine_id": "web-01"})[0] == 201
    # Used up.
    status, problem = api("POST", "/api/v1/enroll", None, {**body, "machine_id": "web-02"})
    assert status == 401 and "used-up" in problem["detail"]
    # Revoked.
    other = _enroll_token(api, admin_key, uses=5)
    assert api("DELETE", f"/api/v1/enroll-tokens/{other['id']}", admin_key)[0] == 200
    status, problem = api(
        "POST", "/api/v1/enroll", None, {"enroll_token": other["token"], "machine_id": "web-03"}
    )
    assert status == 401 and "revoked" in problem["detail"]
    # Unknown, missing.
    assert (
        api("POST", "/api/v1/enroll", None, {"enroll_token": "nfe_x", "machine_id": "a"})[0] == 401
    )
    assert api("POST", "/api/v1/enroll", None, {"machine_id": "a"})[0] == 401
    # Both spellings of the id at once.
    third = _enroll_token(api, admin_key)
    twice = {"enroll_token": third["token"], "machine_id": "a", "id": "b"}
    assert api("POST", "/api/v1/enroll", None, twice)[0] == 422


def test_expired_enrollment_token_is_refused(api: Api, store: Store) -> None:
    long_ago = utcnow() - timedelta(hours=2)
    with store.transaction() as conn:
        token, secret = enrollment.create(
            conn,
            uses=3,
            lifetime=timedelta(hours=1),
            tags=[],
            hostname_glob=None,
            created_by="test",
            now=long_ago,
        )
    before = dump(store)
    status, problem = api(
        "POST", "/api/v1/enroll", None, {"enroll_token": secret, "machine_id": "web-01"}
    )
    assert status == 401 and "expired" in problem["detail"]
    assert dump(store) == before
    with store.read() as conn:
        assert enrollment.get(conn, token.id).state(utcnow()) == "expired"


def test_enrollment_cannot_take_over_a_machine_with_a_live_token(
    api: Api, admin_key: str, store: Store
) -> None:
    live = _register(api, admin_key, "web-01")
    _register(api, admin_key, "web-02", token=False)
    et = _enroll_token(api, admin_key, uses=10)
    before = dump(store)
    status, problem = api(
        "POST", "/api/v1/enroll", None, {"enroll_token": et["token"], "machine_id": "web-01"}
    )
    assert status == 409 and "revoke-token" in problem["detail"]
    assert dump(store) == before
    assert _report(api, "web-01", live) == 200
    # Pre-registered without a token: enrollment issues it (the planned path).
    status, out = api(
        "POST", "/api/v1/enroll", None, {"enroll_token": et["token"], "machine_id": "web-02"}
    )
    assert status == 201
    # Reinstalled host: the operator revokes, then the agent may enroll again.
    api("DELETE", "/api/v1/machines/web-01/token", admin_key)
    status, out = api(
        "POST", "/api/v1/enroll", None, {"enroll_token": et["token"], "machine_id": "web-01"}
    )
    assert status == 201 and _report(api, "web-01", out["token"]) == 200
    api("PATCH", "/api/v1/machines/web-02/lifecycle", admin_key, {"lifecycle": "decommissioned"})
    status, _ = api(
        "POST", "/api/v1/enroll", None, {"enroll_token": et["token"], "machine_id": "web-02"}
    )
    assert status == 410


@pytest.mark.parametrize(
    "body",
    [
        {"uses": 0},
        {"uses": 10**6},
        {"expires_in_seconds": 10},
        {"expires_in_seconds": 10**9},
        {"hostname_glob": "../*"},
        {"tags": ["=cmd|' /C calc'!A0"]},
        {"token": "nfe_chosen-by-the-caller"},
    ],
)
def test_invalid_enrollment_token_bodies(
    api: Api, admin_key: str, store: Store, body: dict[str, Any]
) -> None:
    before = dump(store)
    assert api("POST", "/api/v1/enroll-tokens", admin_key, body)[0] == 422
    assert dump(store) == before


def test_enroll_token_item_routes(api: Api, admin_key: str) -> None:
    et = _enroll_token(api, admin_key)
    status, one = api("GET", f"/api/v1/enroll-tokens/{et['id']}", admin_key)
    assert status == 200 and one["id"] == et["id"] and "token" not in one
    assert api("GET", "/api/v1/enroll-tokens/et-000000000000", admin_key)[0] == 404
    assert api("DELETE", "/api/v1/enroll-tokens/..%2f..", admin_key)[0] == 404


# --- CLI credentials file -------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_credentials_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "key"
    path.write_text("nfk_secret\n")
    path.chmod(mode)
    with pytest.raises(UsageError, match="chmod 600"):
        read_secret_file(path)


def test_credentials_file_0600_is_read(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text("nfk_secret\n")
    path.chmod(0o600)
    assert read_secret_file(path) == "nfk_secret"
