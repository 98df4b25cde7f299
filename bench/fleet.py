"""A synthetic fleet: deterministic hostnames, tokens, generations and report bodies.

Everything is derived from the machine index (and a seed), so the database builder
and the load-generator processes agree on every machine's token and report body
without passing 100,000 secrets between processes.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from nixfleet.client import encode  # report bodies in the form the agent sends them

SEED = "nixfleet-bench"
ROLES = ("web", "db", "cache", "worker", "ci")
ENVS = ("prod", "prod", "prod", "staging")
HEALTH = {
    "all_passed": True,
    "results": [
        {"name": "system", "kind": "system", "passed": True, "duration_ms": 3, "message": ""},
        {
            "name": "nginx.service",
            "kind": "systemd",
            "passed": True,
            "duration_ms": 2,
            "message": "active",
        },
    ],
}


def hostname(i: int) -> str:
    return f"m{i:06d}.fleet.example"


def token(i: int) -> str:
    """A machine token shaped like credentials.issue_token's (nfm_ + 43 urlsafe chars)."""
    raw = hashlib.sha256(f"{SEED}-token-{i}".encode()).digest()
    return "nfm_" + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def store_path(i: int, name: str) -> str:
    digest = hashlib.sha256(f"{SEED}-{name}-{i}".encode()).hexdigest()
    # Nix base-32 alphabet: digits and lowercase letters without e, o, t, u.
    alphabet = "0123456789abcdfghijklmnpqrsvwxyz"
    h = "".join(alphabet[int(c, 16) * 2 % 32] for c in digest[:32])
    return f"/nix/store/{h}-nixos-system-{name}"


def current_generation(i: int) -> str:
    return store_path(i, f"m{i:06d}-24.11.1")


def next_generation(i: int, release: str = "") -> str:
    return store_path(i, f"m{i:06d}-24.11.2{release}")


def agent_tags(i: int) -> list[str]:
    return sorted({ENVS[i % len(ENVS)], ROLES[i % len(ROLES)], f"rack-{i % 200:03d}"})


def operator_tags(i: int) -> list[str]:
    return [f"region-{('eu', 'us', 'ap')[i % 3]}"]


def report_body(i: int) -> dict[str, Any]:
    """What a healthy, up-to-date agent sends on every poll (DESIGN §4)."""
    return {
        "current_generation": current_generation(i),
        "tags": agent_tags(i),
        "success": True,
        "message": "running",
        "health": HEALTH,
        "agent_version": "0.1.0",
        "uptime_seconds": 86_400 + i,
    }


def report_bytes(i: int) -> bytes:
    return encode(report_body(i))


def change_body(i: int, nonce: int) -> dict[str, Any]:
    """A report that changes state: a new message, health turning with the nonce's parity."""
    body = report_body(i)
    body["message"] = f"deployed {nonce}"
    if nonce % 2:
        results = [dict(r) for r in HEALTH["results"]]
        results[1].update(passed=False, message="failed")
        body["health"] = {"all_passed": False, "results": results}
    return body


def change_bytes(i: int, nonce: int) -> bytes:
    return encode(change_body(i, nonce))
