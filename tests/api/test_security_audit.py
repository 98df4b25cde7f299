"""The audit log: every successful mutation leaves a row naming its actor; reading and
exporting it (CSV safe against spreadsheet formulas)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from typing import Any

import pytest
from security_helpers import MUTATING, make_client, route_methods

from nixfleet.api.auth import Perm
from nixfleet.cli.audit import csv_cell, to_csv
from nixfleet.models import utcnow
from nixfleet.store import Store, credentials

STORE_PATH = "/nix/store/" + "b" * 32 + "-nixos-system-web-01"

# POSTs that change nothing the audit log is about: what agent telemetry changes is
# kept, with its machine and time, in the machine's history (the hot path writes no
# audit row per poll), except the first report's lifecycle promotion, which is audited.
NOT_AUDITED = {
    ("/api/v1/machines/{machine_id}/report", "POST"): "agent telemetry; changes go to history",
}


class World:
    """A store with an admin key, an agent token for web-01 and what recipes need."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.client = make_client(store)
        now = utcnow()
        with store.transaction() as conn:
            self.admin = credentials.create_key(conn, "ops", "admin", "test", now)
        self.agent = self.call("POST", "/api/v1/machines", {"id": "web-01", "issue_token": True})[
            "token"
        ]
        self.call("POST", "/api/v1/machines", {"id": "web-02"})
        self.call("POST", "/api/v1/keys", {"name": "victim", "role": "readonly"})
        self.enroll = self.call("POST", "/api/v1/enroll-tokens", {"uses": 5})

    def call(self, method: str, path: str, body: Any = None, secret: str | None = None) -> Any:
        r = self.client.simulate_request(
            method,
            path,
            headers={
                "Content-Type": "application/json",
                "Authorization": f"Bearer {secret or self.admin}",
            },
            body=json.dumps(body if body is not None else {}).encode(),
        )
        assert r.status_code < 300, f"{method} {path}: {r.status} {r.text}"
        return json.loads(r.text) if r.text else None

    def audit_count(self) -> int:
        with self.store.read() as conn:
            row = conn.execute("SELECT COUNT(*) FROM audit").fetchone()
        return int(row[0])


Recipe = Callable[[World], tuple[str, Any, str | None]]

# (route template, method) -> how to make that request succeed: (path, body, secret).
RECIPES: dict[tuple[str, str], Recipe] = {
    ("/api/v1/machines", "POST"): lambda w: ("/api/v1/machines", {"id": "web-09"}, None),
    ("/api/v1/machines/{machine_id}/lifecycle", "PATCH"): lambda w: (
        "/api/v1/machines/web-02/lifecycle",
        {"lifecycle": "provisioning"},
        None,
    ),
    ("/api/v1/machines/{machine_id}/tags", "POST"): lambda w: (
        "/api/v1/machines/web-02/tags",
        {"tags": ["canary"]},
        None,
    ),
    ("/api/v1/machines/{machine_id}/tags", "DELETE"): lambda w: (
        "/api/v1/machines/web-02/tags",
        {"tags": ["canary"]},
        None,
    ),
    ("/api/v1/machines/{machine_id}/desired-generation", "PUT"): lambda w: (
        "/api/v1/machines/web-02/desired-generation",
        {"store_path": STORE_PATH},
        None,
    ),
    ("/api/v1/machines/{machine_id}/desired-generation", "DELETE"): lambda w: (
        "/api/v1/machines/web-02/desired-generation",
        None,
        None,
    ),
    ("/api/v1/machines/{machine_id}/retry", "POST"): lambda w: (
        "/api/v1/machines/web-02/retry",
        None,
        None,
    ),
    ("/api/v1/machines/{machine_id}/token", "POST"): lambda w: (
        "/api/v1/machines/web-02/token",
        None,
        None,
    ),
    ("/api/v1/machines/{machine_id}/token", "DELETE"): lambda w: (
        "/api/v1/machines/web-02/token",
        None,
        None,
    ),
    ("/api/v1/keys", "POST"): lambda w: ("/api/v1/keys", {"name": "ci", "role": "deploy"}, None),
    ("/api/v1/keys/{name}", "DELETE"): lambda w: ("/api/v1/keys/victim", None, None),
    ("/api/v1/enroll-tokens", "POST"): lambda w: (
        "/api/v1/enroll-tokens",
        {"uses": 2, "tags": ["prod"]},
        None,
    ),
    ("/api/v1/enroll-tokens/{token_id}", "DELETE"): lambda w: (
        f"/api/v1/enroll-tokens/{w.enroll['id']}",
        None,
        None,
    ),
    ("/api/v1/enroll", "POST"): lambda w: (
        "/api/v1/enroll",
        {"machine_id": "web-10"},
        w.enroll["token"],
    ),
}


def _release(w: World) -> str:
    body = {
        "flake_ref": "github:example/fleet",
        "entries": [{"hostname": "web-02", "store_path": STORE_PATH, "platform": "x86_64-linux"}],
    }
    return str(w.call("POST", "/api/v1/releases", body)["id"])


def _rollout_doc(w: World) -> dict[str, Any]:
    return {
        "version": 1,
        "name": "web-rollout",
        "release": _release(w),
        "target": {"hosts": ["web-02"]},
        "strategy": "all-at-once",
    }


def _rollout(w: World, *then: str) -> str:
    rid = str(w.call("POST", "/api/v1/rollouts", _rollout_doc(w))["id"])
    for action in then:
        w.call("POST", f"/api/v1/rollouts/{rid}/{action}")
    return rid


RECIPES.update(
    {
        ("/api/v1/releases", "POST"): lambda w: (
            "/api/v1/releases",
            {"entries": [{"hostname": "h", "store_path": STORE_PATH, "platform": "x86_64-linux"}]},
            None,
        ),
        ("/api/v1/releases/{release_id}", "DELETE"): lambda w: (
            f"/api/v1/releases/{_release(w)}",
            None,
            None,
        ),
        ("/api/v1/rollouts", "POST"): lambda w: ("/api/v1/rollouts", _rollout_doc(w), None),
        ("/api/v1/rollouts/{rollout_id}/pause", "POST"): lambda w: (
            f"/api/v1/rollouts/{_rollout(w)}/pause",
            None,
            None,
        ),
        ("/api/v1/rollouts/{rollout_id}/resume", "POST"): lambda w: (
            f"/api/v1/rollouts/{_rollout(w, 'pause')}/resume",
            None,
            None,
        ),
        ("/api/v1/rollouts/{rollout_id}/cancel", "POST"): lambda w: (
            f"/api/v1/rollouts/{_rollout(w)}/cancel",
            None,
            None,
        ),
    }
)


def _reboot_lease(w: World, take: bool) -> tuple[str, Any, str | None]:
    """web-01 in a rollout that reboots (DESIGN §11); with `take`, holding its lease."""
    body = {
        "entries": [{"hostname": "web-01", "store_path": STORE_PATH, "platform": "x86_64-linux"}]
    }
    release = w.call("POST", "/api/v1/releases", body)["id"]
    doc = {**_rollout_doc(w), "name": "kernel", "release": release}
    w.call(
        "POST",
        "/api/v1/rollouts",
        {**doc, "target": {"hosts": ["web-01"]}, "reboot": "when-needed"},
    )
    path = "/api/v1/machines/web-01/reboot-lease"
    if take:
        w.call("POST", path, None, w.agent)
    return path, None, w.agent


RECIPES.update(
    {
        ("/api/v1/machines/{machine_id}/reboot-lease", "POST"): lambda w: _reboot_lease(w, False),
        ("/api/v1/machines/{machine_id}/reboot-lease", "DELETE"): lambda w: _reboot_lease(w, True),
    }
)


def _mutating_routes() -> list[tuple[str, str]]:
    return [
        (path, method)
        for path, method, resource in route_methods()
        if method in MUTATING
        # A POST that only computes (e.g. a rollout plan) is readable by readonly keys.
        and resource.permissions[method] not in (Perm.READONLY, Perm.PUBLIC)
        and (path, method) not in NOT_AUDITED
    ]


def test_every_mutating_route_has_a_recipe() -> None:
    """A new mutating route must come with a recipe below, so its audit row is tested."""
    missing = [f"{m} {p}" for p, m in _mutating_routes() if (p, m) not in RECIPES]
    assert not missing, f"add RECIPES entries (and audit rows) for: {missing}"


@pytest.mark.parametrize(("path", "method"), sorted(RECIPES))
def test_successful_mutation_writes_an_audit_row(store: Store, path: str, method: str) -> None:
    world = World(store)
    concrete, body, secret = RECIPES[(path, method)](world)
    before = world.audit_count()
    world.call(method, concrete, body, secret)
    assert world.audit_count() > before, f"{method} {path} succeeded without an audit row"
    with store.read() as conn:
        last = conn.execute("SELECT actor, action, target FROM audit ORDER BY id DESC")
        actor, action, target = last.fetchone()
    assert actor.split(":")[0] in ("key", "enroll", "machine")
    assert action and target


def test_first_report_promotion_is_audited_with_the_machine_as_actor(store: Store) -> None:
    world = World(store)
    world.call(
        "POST",
        "/api/v1/machines/web-01/report",
        {"current_generation": STORE_PATH},
        world.agent,
    )
    entries = world.call("GET", "/api/v1/audit?actor=machine:web-01")["entries"]
    assert [(e["action"], e["detail"]["to"]) for e in entries] == [("machine.lifecycle", "active")]


def test_audit_query_filters_and_limit(store: Store) -> None:
    world = World(store)
    entries = world.call("GET", "/api/v1/audit")["entries"]
    actions = [e["action"] for e in entries]
    assert actions == ["enroll-token.create", "key.create", "machine.register", "machine.register"]
    assert all(e["actor"] == "key:ops" for e in entries)
    assert entries[0]["at"].endswith("Z") or "+00:00" in entries[0]["at"]
    assert len(world.call("GET", "/api/v1/audit?limit=1")["entries"]) == 1
    by_target = world.call("GET", "/api/v1/audit?target=web-02")["entries"]
    assert [e["action"] for e in by_target] == ["machine.register"]
    none = world.call("GET", "/api/v1/audit?action=key.create&target=web-02")["entries"]
    assert none == []
    # Secrets never reach the audit log.
    text = json.dumps(world.call("GET", "/api/v1/audit?limit=10000"))
    assert world.admin not in text and world.agent not in text
    assert world.enroll["token"] not in text


@pytest.mark.parametrize("query", ["limit=0", "limit=-1", "limit=x", "limit=10001", "actor=%00"])
def test_bad_audit_queries_are_4xx(store: Store, query: str) -> None:
    world = World(store)
    r = world.client.simulate_get(
        f"/api/v1/audit?{query}", headers={"Authorization": f"Bearer {world.admin}"}
    )
    assert 400 <= r.status_code < 500, r.text


@pytest.mark.parametrize(
    ("value", "cell"),
    [
        ('=HYPERLINK("http://evil")', '\'=HYPERLINK("http://evil")'),
        ("+1+1", "'+1+1"),
        ("-2", "'-2"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\tx", "'\tx"),
        ("\rx", "'\rx"),
        ("web-01", "web-01"),
        ("key:ops", "key:ops"),
        ({"to": "=1"}, '{"to": "=1"}'),
    ],
)
def test_csv_cells_cannot_be_formulas(value: Any, cell: str) -> None:
    assert csv_cell(value) == cell


def test_csv_export_round_trips_and_neutralises(store: Store) -> None:
    entries = [
        {
            "id": 1,
            "at": "2026-11-27T00:00:00Z",
            "actor": "key:ops",
            "action": "machine.tag",
            "target": "=cmd|' /C calc'!A0",
            "detail": {"tags": ["a,b"]},
        }
    ]
    rows = list(csv.reader(io.StringIO(to_csv(entries))))
    assert rows[0] == ["id", "at", "actor", "action", "target", "detail"]
    assert rows[1][4] == "'=cmd|' /C calc'!A0"
    assert json.loads(rows[1][5]) == {"tags": ["a,b"]}
