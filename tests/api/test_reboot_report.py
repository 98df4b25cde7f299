"""The report path's §11 fields against the real control plane: needs_reboot and
booted_generation stored and shown, and `reboot` answered only when it matters."""

from __future__ import annotations

from typing import Any

from nixfleet.client import Client

OLD = "/nix/store/" + "o" * 32 + "-nixos-system-db-1"
NEW = "/nix/store/" + "n" * 32 + "-nixos-system-db-1"


def rollout(cp: Any, reboot: str) -> None:
    admin = cp.client()
    rel = admin.post(
        "/api/v1/releases",
        {"entries": [{"hostname": "db-1", "store_path": NEW, "platform": "x86_64-linux"}]},
    )
    admin.post(
        "/api/v1/rollouts",
        {
            "version": 1,
            "name": f"kernel-{reboot}",
            "release": rel["id"],
            "target": {"hosts": ["db-1"]},
            "strategy": "all-at-once",
            "reboot": reboot,
        },
    )


def test_report_fields_and_the_reboot_answer(control_plane: Any) -> None:
    cp = control_plane
    agent = Client(cp.url, cp.register("db-1", ["db"]))
    body = {"current_generation": OLD, "needs_reboot": False, "booted_generation": OLD}
    assert agent.report("db-1", body).get("reboot") is None
    m = cp.machine("db-1")
    assert (m["needs_reboot"], m["booted_generation"]) == (False, OLD)

    rollout(cp, "when-needed")
    assert agent.report("db-1", body).get("reboot") is None  # no reboot needed: nothing to say
    answer = agent.report("db-1", {**body, "current_generation": NEW, "needs_reboot": True})
    assert answer["reboot"] == "when-needed"
    m = cp.machine("db-1")
    assert (m["needs_reboot"], m["booted_generation"]) == (True, OLD)
    # An older agent that sends neither keeps what was known of the booted generation.
    agent.report("db-1", {"current_generation": NEW})
    assert cp.machine("db-1")["booted_generation"] == OLD


def test_reboot_never_answers_nothing(control_plane: Any) -> None:
    cp = control_plane
    agent = Client(cp.url, cp.register("db-1", ["db"]))
    rollout(cp, "never")
    answer = agent.report("db-1", {"current_generation": NEW, "needs_reboot": True})
    assert answer.get("reboot") is None
    assert cp.machine("db-1")["needs_reboot"] is True


def test_status_and_machines_show_say_needs_reboot(control_plane: Any) -> None:
    from conftest import run_cli

    cp = control_plane
    agent = Client(cp.url, cp.register("db-1", ["db"]))
    agent.report(
        "db-1", {"current_generation": NEW, "needs_reboot": True, "booted_generation": OLD}
    )
    env = {"NIXFLEET_CONTROL_PLANE_URL": cp.url, "NIXFLEET_API_KEY": cp.admin_key, "NO_COLOR": "1"}
    status = run_cli("status", env=env)
    assert status.returncode == 0, status.stderr
    line = next(x for x in status.stdout.splitlines() if x.startswith("db-1"))
    assert "NEEDS REBOOT" in line
    show = run_cli("machines", "show", "db-1", env=env)
    assert "needs reboot" in show.stdout and OLD in show.stdout
    data = cp.client().get("/api/v1/status")
    assert data["machines"][0]["needs_reboot"] is True
