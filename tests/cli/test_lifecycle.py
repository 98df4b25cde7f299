"""Lifecycle without traps: decommissioned machines, and set-lifecycle that scripts may repeat."""

from __future__ import annotations

import json
import sqlite3
import urllib.request
from pathlib import Path

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


def test_plan_and_apply_warn_about_decommissioned_and_stale_targets(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """DESIGN §3 Lifecycle: both answers carry `warnings`; the CLI prints them to stderr."""
    cp = control_plane
    idle = [f"idle-{i:02}" for i in range(12)]
    for name in ("web-01", "web-02", "old-01", *idle):
        tags = ["idle"] if name.startswith("idle") else ["web"]
        Client(cp.url, cp.register(name, tags)).report(name, {"current_generation": GEN})
    cp.client().set_lifecycle("old-01", "decommissioned")
    db = sqlite3.connect(cp.db)
    with db:
        db.execute(
            "UPDATE machines SET last_report_at = ? WHERE id = 'web-02' OR id LIKE 'idle-%'",
            (LONG_AGO,),
        )
    db.close()
    release = cp.client().register_release(
        {
            "cache_url": "https://cache.example.com",
            "entries": [
                {"hostname": h, "store_path": GEN, "platform": "x86_64-linux"}
                for h in ("web-01", "web-02", "old-01", *idle)
            ],
        }
    )["id"]

    def rollout_file(name: str, tag: str, **extra: object) -> str:
        doc = {"version": 1, "name": name, "release": release, "target": {"tags": [tag]}}
        path = tmp_path / f"{name}.yaml"
        path.write_text(json.dumps({**doc, "strategy": "all-at-once", **extra}))
        return str(path)

    web = rollout_file("web", "web")
    plan = run_cli("rollout", "plan", "-f", web, env=env(cp))
    assert plan.returncode == 0, plan.stderr
    assert "warning: old-01 is decommissioned: its reports are refused" in plan.stderr
    assert f"warning: web-02 is stale: no report since {LONG_AGO}" in plan.stderr
    assert "web-01" not in plan.stderr and "warning" not in plan.stdout
    doc = json.loads(run_cli("rollout", "plan", "-f", web, "--json", env=env(cp)).stdout)
    assert [(w["hostname"], w["kind"], w["last_report_at"]) for w in doc["warnings"]] == [
        ("old-01", "decommissioned", doc["warnings"][0]["last_report_at"]),
        ("web-02", "stale", LONG_AGO),
    ]
    applied = run_cli("rollout", "apply", "-f", web, "--json", env=env(cp))
    assert applied.returncode == 0, applied.stderr
    assert json.loads(applied.stdout)["warnings"] == doc["warnings"]
    assert "warning: old-01 is decommissioned" in applied.stderr
    again = run_cli("rollout", "apply", "-f", web, env=env(cp))  # unchanged: still warned
    assert "unchanged" in again.stderr and "warning: web-02 is stale" in again.stderr
    # Skipping decommissioned targets leaves only the stale one to warn about.
    skipping = rollout_file("web-skip", "web", skip_lifecycle=["decommissioned"])
    plan = run_cli("rollout", "plan", "-f", skipping, env=env(cp))
    assert "old-01 is decommissioned" not in plan.stderr and "web-02 is stale" in plan.stderr
    # Many: ten named per kind, then how many more.
    plan = run_cli("rollout", "plan", "-f", rollout_file("idle", "idle"), env=env(cp))
    warned = [line for line in plan.stderr.splitlines() if line.startswith("warning:")]
    assert (
        len(warned) == 11 and warned[-1] == "warning: and 2 more stale targets (--json lists them)"
    )
    # The answers' documented shape says so.
    spec = cp.client().get("/api/v1/openapi.json")
    for path in ("/api/v1/rollouts", "/api/v1/rollouts/plan"):
        answer = spec["paths"][path]["post"]["responses"]["200"]["content"]["application/json"]
        assert answer["schema"]["required"] == ["warnings"]
