"""A small, varied fleet on a real control plane, built through its API only.

Shared by the browser tests and the screenshot command: machines in sync, updating,
failed (rolled back), never reported and stale-free; healthy, failing and unknown
health; tags from both sources; a running staged rollout; one hostile machine whose
message and tags carry markup (agent-supplied text is hostile).
"""

from __future__ import annotations

import time
from typing import Any

from nixfleet.client import Client

HOSTILE_ID = "evil-01"
HOSTILE_MESSAGE = '<script>alert("pwned")</script><img src=x onerror=alert(1)> <b>bold</b>'
HOSTILE_TAG = "x:<b>tag</b>"  # refused by the tag pattern: see hostile_tags
HOSTILE_CHECK = '<img src=x onerror=alert("check")>'


def gen(host: str, salt: str) -> str:
    return f"/nix/store/{salt * 32}-nixos-system-{host}"


def health(*checks: tuple[str, bool, str]) -> dict[str, Any]:
    return {
        "all_passed": all(ok for _, ok, _ in checks),
        "results": [
            {"name": n, "kind": "systemd", "passed": ok, "duration_ms": 12, "message": msg}
            for n, ok, msg in checks
        ],
    }


WEB = [f"web-{i:02}" for i in range(1, 9)]
DB = ["db-01", "db-02"]
EDGE = ["edge-01", "edge-02", "edge-03"]


def build(url: str, admin_key: str, rollout: bool = True) -> dict[str, str]:
    """Register and report the fleet; returns the agent token of each machine."""
    admin = Client(url, admin_key)
    tokens: dict[str, str] = {}

    def register(host: str, tags: list[str]) -> None:
        m = admin.post("/api/v1/machines", {"id": host, "tags": tags, "issue_token": True})
        tokens[host] = m["token"]

    def report(host: str, **body: Any) -> None:
        Client(url, tokens[host]).report(host, body)

    ok = health(("sshd.service", True, "active"), ("nginx.service", True, "active"))
    for i, host in enumerate(WEB):
        register(host, ["canary"] if i == 0 else [])
        report(host, current_generation=gen(host, "a"), tags=["web", "prod"], health=ok)
    for host in DB:
        register(host, ["db"])
        report(
            host,
            current_generation=gen(host, "a"),
            tags=["db", "prod"],
            health=health(("postgresql.service", True, "active")),
        )
    for host in EDGE:
        register(host, ["edge"])
    report("edge-01", current_generation=gen("edge-01", "a"), tags=["edge", "staging"])
    # A machine whose agent says hostile things: message, tags, health check names.
    register(HOSTILE_ID, ["prod"])
    report(
        HOSTILE_ID,
        current_generation=gen(HOSTILE_ID, "a"),
        tags=["prod", "x:b-tag"],
        success=True,
        message=HOSTILE_MESSAGE,
        health=health((HOSTILE_CHECK, False, "<i>failed</i> & 'quoted'")),
    )
    # db-02 failed to switch to its desired generation and rolled back.
    admin.request(
        "PUT",
        "/api/v1/machines/db-02/desired-generation",
        {"store_path": gen("db-02", "b"), "cache_url": None},
    )
    report(
        "db-02",
        current_generation=gen("db-02", "a"),
        success=False,
        attempted_generation=gen("db-02", "b"),
        message="rolled back: postgresql.service failed to start",
        health=health(("postgresql.service", False, "failed (Result: exit-code)")),
    )
    admin.request("PATCH", "/api/v1/machines/edge-03/lifecycle", {"lifecycle": "provisioning"})
    if rollout:
        start_rollout(admin)
    return tokens


def settle(url: str, admin_key: str, timeout: float = 30.0) -> None:
    """Wait until the reconciler started the rollout's canary batch: from then on the
    fleet holds still (no agent polls), so two reads of it agree."""
    admin = Client(url, admin_key)
    deadline = time.monotonic() + timeout
    while admin.get("/api/v1/machines/web-01")["desired_generation"] is None:
        if time.monotonic() > deadline:
            raise AssertionError("the reconciler did not start the canary batch")
        time.sleep(0.05)


def start_rollout(admin: Client, name: str = "web-2026-12-02") -> str:
    release = admin.post(
        "/api/v1/releases",
        {
            "flake_ref": "git+https://git.example.com/fleet",
            "flake_rev": "1" * 40,
            "cache_url": "https://cache.example.com",
            "entries": [
                {
                    "hostname": h,
                    "store_path": gen(h, "c"),
                    "platform": "x86_64-linux",
                    "tags": ["web"],
                }
                for h in WEB
            ],
        },
    )
    r = admin.post(
        "/api/v1/rollouts",
        {
            "version": 1,
            "name": name,
            "release": release["id"],
            "target": {"tags": ["web"]},
            "strategy": "canary",
            "batches": [1, "50%", "100%"],
            "failure_threshold": 0,
            "on_failure": "pause",
            "health_timeout": "1h",
            "soak": "0s",
        },
    )
    rid: str = r["id"]
    return rid
