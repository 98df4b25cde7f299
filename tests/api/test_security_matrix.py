"""Every route x every identity: 401 without (valid) credentials, 403 with too little.

The cases are generated from the app's route table and each resource's declared
`permissions`, so a route added later is covered the moment it is routed; the
expectations below are written out independently of nixfleet.api.auth, and an
unknown permission kind fails collection instead of slipping through.
"""

from __future__ import annotations

import json
from pathlib import Path

import falcon.inspect
import pytest
from security_helpers import (
    OTHER,
    Seeded,
    concrete,
    make_client,
    request,
    route_methods,
    seed,
    seeded_copy,
)

from nixfleet.api.app import ROUTES, create_app
from nixfleet.api.auth import Perm
from nixfleet.settings import Settings
from nixfleet.store import Store

IDENTITIES = (
    "none",
    "readonly",
    "deploy",
    "admin",
    "agent-own",
    "agent-other",
    "revoked-key",
    "revoked-token",
    "enroll-token",
    "garbage",
)

P, U, F = "pass", 401, 403  # got past auth / unauthenticated / forbidden
_KEYS_ANON = {"none": U, "revoked-key": U, "revoked-token": U, "enroll-token": U, "garbage": U}
EXPECTED: dict[Perm, dict[str, str | int]] = {
    Perm.PUBLIC: dict.fromkeys(IDENTITIES, P),
    Perm.READONLY: {
        **_KEYS_ANON,
        "readonly": P,
        "deploy": P,
        "admin": P,
        "agent-own": F,
        "agent-other": F,
    },
    Perm.DEPLOY: {
        **_KEYS_ANON,
        "readonly": F,
        "deploy": P,
        "admin": P,
        "agent-own": F,
        "agent-other": F,
    },
    Perm.ADMIN: {
        **_KEYS_ANON,
        "readonly": F,
        "deploy": F,
        "admin": P,
        "agent-own": F,
        "agent-other": F,
    },
    Perm.AGENT: {
        **_KEYS_ANON,
        "readonly": F,
        "deploy": F,
        "admin": F,
        "agent-own": P,
        "agent-other": F,
    },
    Perm.AGENT_OR_READONLY: {
        **_KEYS_ANON,
        "readonly": P,
        "deploy": P,
        "admin": P,
        "agent-own": P,
        "agent-other": F,
    },
    # The enrollment token is the credential; with the empty test body the responder
    # gets past auth and refuses the body (422). Keys and machine tokens are the wrong kind.
    Perm.ENROLL: {
        **_KEYS_ANON,
        "enroll-token": P,
        "readonly": F,
        "deploy": F,
        "admin": F,
        "agent-own": F,
        "agent-other": F,
    },
}
assert set(EXPECTED) == set(Perm), f"add expectations for {set(Perm) - set(EXPECTED)}"


def _cases() -> list[tuple[str, str, str, str | int]]:
    cases = []
    for path, method, resource in route_methods():
        perm = resource.permissions[method]  # KeyError: a responder without a permission
        for who in IDENTITIES:
            cases.append((path, method, who, EXPECTED[perm][who]))
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Seeded]:
    path = tmp_path_factory.mktemp("template") / "nixfleet.db"
    store = Store(path)
    seeded = seed(store)
    store.close()
    return path, seeded


@pytest.mark.parametrize(
    ("path", "method", "who", "expected"), CASES, ids=[f"{m} {p} as {w}" for p, m, w, _ in CASES]
)
def test_auth_decision(
    template: tuple[Path, Seeded],
    tmp_path: Path,
    path: str,
    method: str,
    who: str,
    expected: str | int,
) -> None:
    db = seeded_copy(template[0], tmp_path)
    secrets = {**template[1].secrets, "garbage": "nfk_not-a-real-key"}
    store = Store(db)
    try:
        client = make_client(store)
        # agent-other uses the token of m-b on routes about m-a (the default machine).
        resp = request(client, method, concrete(path), secrets[who])
    finally:
        store.close()
    where = f"{method} {path} as {who}: {resp.status} {resp.text[:300]}"
    assert resp.status_code < 500, where
    if expected == P:
        assert resp.status_code not in (401, 403), where
    else:
        assert resp.status_code == expected, where
        assert resp.headers["content-type"] == "application/problem+json", where
        problem = json.loads(resp.text)
        assert problem["status"] == expected
        assert problem["type"].endswith("/unauthorized" if expected == 401 else "/forbidden")
        assert problem["detail"]
        if expected == 401:
            assert resp.headers["www-authenticate"].startswith("Bearer")
        for secret in secrets.values():
            assert secret is None or secret not in resp.text, "a secret was echoed back"


def test_agent_other_really_is_another_machine(template: tuple[Path, Seeded]) -> None:
    assert concrete("/api/v1/machines/{machine_id}/report") != concrete(
        "/api/v1/machines/{machine_id}/report", OTHER
    )


def test_matrix_covers_every_route_falcon_serves(tmp_path: Path) -> None:
    """Routes added to the app outside ROUTES, or responders nobody declared, fail here."""
    store = Store(tmp_path / "db.sqlite")
    try:
        # The dashboard's pages check sessions themselves: tests/ui/test_routes.py.
        app = create_app(Settings(db=str(store.path), ui=False), store)
        served = {
            (route.path, method.method)
            for route in falcon.inspect.inspect_app(app).routes
            for method in route.methods
            if not method.internal and method.method in ("GET", "POST", "PUT", "PATCH", "DELETE")
        }
    finally:
        store.close()
    covered = {(p, m) for p, m, _ in route_methods()}
    assert served == covered
    assert {p for p, _ in served} == {p for p, _ in ROUTES}
    for path, method, resource in route_methods():
        assert isinstance(resource.permissions.get(method), Perm), f"{method} {path}"
        # Every route but the public ones and enrollment is tested for 401 and 403.
    assert len(CASES) == len(covered) * len(IDENTITIES)


def test_docs_security_md_lists_every_route_with_its_permission() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    for path, method, resource in route_methods():
        row = f"| {method} | `{path}` | {resource.permissions[method].value} |"
        assert row in docs, f"docs/security.md lacks: {row}"


@pytest.mark.parametrize(
    ("url", "allow", "refused"),
    [
        ("http://10.0.0.5:8470", False, True),
        ("http://fleet.example.com", False, True),
        ("http://127.0.0.1.example.com", False, True),
        ("http://10.0.0.5:8470", True, False),
        ("https://fleet.example.com", False, False),
        ("http://127.0.0.1:8470", False, False),
        ("http://[::1]:8470", False, False),
        ("http://localhost:8470", False, False),
    ],
)
def test_agent_refuses_plain_http_to_non_loopback(url: str, allow: bool, refused: bool) -> None:
    """Owned by the agent; verified here because docs/security.md promises it."""
    from nixfleet.agent.config import check_transport
    from nixfleet.errors import UsageError

    if refused:
        with pytest.raises(UsageError, match="https"):
            check_transport(url, allow)
    else:
        check_transport(url, allow)
