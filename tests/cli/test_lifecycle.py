"""Lifecycle without traps: decommissioned machines, and set-lifecycle that scripts may repeat."""

from __future__ import annotations

import json
import sqlite3
import urllib.request

from conftest import ControlPlane, run_cli

from nixfleet.client import Client

GEN = "/nix/store/" + "a" * 32 + "-nixos-system-x"
LONG_AGO = "2026-01-01T00:00:00.000000Z"


def env(cp: ControlPlane) -> dict[str, str]:
    return {"NIXFLEET_CONTROL_PLANE_URL": cp.url, "NIXFLEET_API_KEY": cp.admin_key}


def test_decommissioned_machines_are_listed_never_stale_and_not_in_the_summary(
    control_plane: ControlPlane,
) -> None:
    cp = control_plane
    for name in ("web-01", "web-02", "old-01"):
        Client(cp.url, cp.register(name)).report(name, {"current_generation": GEN})
    cp.set_desired("web-01", GEN)
    cp.client().set_lifecycle("old-01", "decommissioned")
    db = sqlite3.connect(cp.db)  # both went quiet long ago
    with db:
        db.execute(
            "UPDATE machines SET last_report_at = ? WHERE id IN ('old-01', 'web-02')", (LONG_AGO,)
        )
    db.close()
    r = run_cli("status", "--json", env=env(cp))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    stale = {m["id"]: m["stale"] for m in doc["machines"]}
    assert stale == {"old-01": False, "web-01": False, "web-02": True}  # listed, never stale
    s = doc["summary"]
    assert (s["total"], s["in_sync"], s["no_desired"], s["stale"]) == (2, 1, 1, 1)
    assert s["by_lifecycle"]["decommissioned"] == 1
    table = run_cli("status", env=env(cp))
    assert "old-01" in table.stdout and "1/2 machines in sync" in table.stdout + table.stderr
    old = cp.client().machine("old-01")
    assert old["stale"] is False and old["lifecycle"] == "decommissioned"
    with urllib.request.urlopen(f"{cp.url}/metrics") as resp:
        metrics = resp.read().decode()
    assert "nixfleet_machines_in_sync 1\n" in metrics
    assert 'nixfleet_machines{lifecycle="decommissioned"} 1\n' in metrics


def test_set_lifecycle_to_the_current_state_is_a_quiet_no_op(control_plane: ControlPlane) -> None:
    cp = control_plane
    cp.register("web-01")
    for _ in range(2):
        r = run_cli("machines", "set-lifecycle", "web-01", "provisioning", env=env(cp))
        assert r.returncode == 0, r.stderr
        assert "web-01: provisioning" in r.stderr
    audit = cp.client().get("/api/v1/audit")
    changes = [e for e in audit["entries"] if e["action"] == "machine.lifecycle"]
    assert len(changes) == 1
    history = cp.client().machine_history("web-01", kinds=["lifecycle"])["events"]
    assert [e["detail"]["to"] for e in history] == ["provisioning"]
    # Still refused: a transition the table does not have (exit 4, naming the states).
    r = run_cli("machines", "set-lifecycle", "web-01", "maintenance", env=env(cp))
    assert r.returncode == 4 and "provisioning" in r.stderr and "maintenance" in r.stderr
