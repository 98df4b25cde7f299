"""Shared pieces of the security tests: an in-process app over a real SQLite store,
seeded with one key per role, two machines with agent tokens, and revoked credentials."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import falcon
import falcon.testing

from nixfleet.api.app import ROUTES, create_app
from nixfleet.models import Lifecycle, utcnow
from nixfleet.settings import Settings
from nixfleet.store import credentials, enrollment, machines
from nixfleet.store.conn import AnyStore, is_postgresql

MUTATING = ("POST", "PUT", "PATCH", "DELETE")
ROUTE_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
OWN, OTHER = "m-a", "m-b"


@dataclass
class Seeded:
    """Secrets of a seeded database, by identity name."""

    secrets: dict[str, str | None]


def seed(store: AnyStore) -> Seeded:
    now = utcnow()
    out: dict[str, str | None] = {"none": None}
    with store.transaction() as conn:
        for role in ("readonly", "deploy", "admin"):
            out[role] = credentials.create_key(conn, f"k-{role}", role, "test", now)
        revoked = credentials.create_key(conn, "k-revoked", "admin", "test", now)
        credentials.revoke_key(conn, "k-revoked", now)
        out["revoked-key"] = revoked
        for machine_id in (OWN, OTHER, "m-c"):
            machines.register(conn, machine_id, ["prod"], Lifecycle.PENDING, now)
        out["agent-own"] = credentials.issue_token(conn, OWN, now)
        out["agent-other"] = credentials.issue_token(conn, OTHER, now)
        out["revoked-token"] = credentials.issue_token(conn, "m-c", now)
        credentials.revoke_token(conn, "m-c")
        _, out["enroll-token"] = enrollment.create(
            conn,
            uses=100,
            lifetime=timedelta(days=1),
            tags=["prod"],
            hostname_glob=None,
            created_by="test",
            now=now,
        )
    return Seeded(out)


def seeded_copy(template: Path, target_dir: Path) -> Path:
    """A fresh copy of the seeded template database (cheaper than migrating anew)."""
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / "nixfleet.db"
    shutil.copyfile(template, target)
    return target


def make_client(store: AnyStore) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(create_app(Settings(), store))


def concrete(path: str, machine_id: str = OWN) -> str:
    """A route template with its parameters filled in (machine ids get a real machine)."""
    out = path.replace("{machine_id}", machine_id)
    while "{" in out:
        start = out.index("{")
        out = out[:start] + "x" + out[out.index("}", start) + 1 :]
    return out


def route_methods() -> list[tuple[str, str, type[Any]]]:
    """Every (path, method, resource class) the app serves, from the route table."""
    return [
        (path, method, resource)
        for path, resource in ROUTES
        for method in ROUTE_METHODS
        if hasattr(resource, f"on_{method.lower()}")
    ]


def dump(store: AnyStore) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, on either backend: compared before/after a rejected request."""
    with store.read() as conn:
        names = [
            r[0]
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = 'public' AND table_type = 'BASE TABLE'"
                if is_postgresql(conn)
                else "SELECT name FROM sqlite_master WHERE type = 'table' "
                "AND name NOT LIKE 'sqlite_%'"
            )
        ]
        return {
            n: sorted((tuple(r) for r in conn.execute(f'SELECT * FROM "{n}"')), key=repr)
            for n in names
        }


def request(
    client: falcon.testing.TestClient,
    method: str,
    path: str,
    secret: str | None,
    body: bytes | None = None,
    content_type: str = "application/json",
) -> falcon.testing.Result:
    headers = {"Content-Type": content_type}
    if secret is not None:
        headers["Authorization"] = f"Bearer {secret}"
    if body is None and method in MUTATING:
        body = b"{}"
    return client.simulate_request(method, path, headers=headers, body=body)
