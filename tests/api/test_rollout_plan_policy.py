"""`POST /api/v1/rollouts/plan` tells when each batch can start and what holds it (§11)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import falcon.testing

from nixfleet.api.app import create_app
from nixfleet.flake import release_from_document
from nixfleet.models import Lifecycle, utcnow
from nixfleet.policy import gate, windows
from nixfleet.policy.budgets import Room
from nixfleet.settings import Settings
from nixfleet.store import Store, credentials, machines, releases


def gen(host: str) -> str:
    return f"/nix/store/{'n' * 32}-nixos-system-{host}"


def test_plan_shows_windows_and_budgets(store: Store, tmp_path: Path) -> None:
    clock = tmp_path / "clock"
    clock.write_text("2026-12-06T12:00:00Z")  # Sunday
    settings = Settings(
        disruption_budgets=({"tags": ["db"], "max_in_flight": 1},),
        policy_clock_file=str(clock),
    )
    hosts = {"db-1": ["db"], "db-2": ["db"], "web-1": ["web"], "web-2": ["web"]}
    with store.transaction() as conn:
        key = credentials.create_key(conn, "ops", "readonly", "test", utcnow())
        for h, tags in hosts.items():
            machines.register(conn, h, tags, Lifecycle.ACTIVE, utcnow())
        rel = release_from_document(
            {
                "entries": [
                    {"hostname": h, "store_path": gen(h), "platform": "x86_64-linux"} for h in hosts
                ]
            }
        )
        releases.insert(conn, rel, utcnow(), "test")
    client = falcon.testing.TestClient(create_app(settings, store))
    doc: dict[str, Any] = {
        "version": 1,
        "name": "p",
        "release": rel.id,
        "target": {"hosts": sorted(hosts)},
        "strategy": "staged",
        "batches": [2, 2],
        "soak": "10m",
        "windows": [
            {"days": ["mon"], "start": "09:00", "end": "12:00", "timezone": "Europe/Berlin"}
        ],
    }
    r = client.simulate_post(
        "/api/v1/rollouts/plan",
        body=json.dumps(doc),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    assert r.status_code == 200, r.text
    b0, b1 = r.json["batches"]
    assert b0["hosts"] == ["db-1", "db-2"]
    assert b0["earliest_start"].startswith("2026-12-07T08:00:00")  # Monday 09:00 Berlin
    assert "Europe/Berlin" in b0["waiting_for_window"]
    assert (b0["at_once"], b0["held_by"]) == (1, "disruption budget [db] (max_in_flight 1)")
    assert b1["earliest_start"].startswith("2026-12-07T08:10:00")  # after the soak
    assert "held_by" not in b1  # web machines: nothing holds them


def test_outlook_without_windows_is_now() -> None:
    now = datetime(2026, 12, 6, 12, tzinfo=UTC)
    out = gate.outlook([[frozenset({"db"})] * 3], [], now, 300, 0, [Room("max_unavailable 2", 2)])
    assert out == [gate.Outlook(now, None, 2, "max_unavailable 2")]
    short = windows.parse([{"days": ["sun"], "start": "12:00", "end": "12:03"}])
    later = gate.outlook([[frozenset()]], short, now, 300, 0, [])
    # A three-minute window, five needed: the same window is used (none is longer).
    assert later[0].earliest == now and later[0].waiting_for is None
