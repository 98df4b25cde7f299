"""The real `nixfleet` CLI against the real control-plane process on 127.0.0.1."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ControlPlane, run_cli
from ports import free_port

from nixfleet.client import Client
from nixfleet.errors import ValidationError
from nixfleet.store import Store, machines

GEN_A = "/nix/store/" + "a" * 32 + "-nixos-system-web-01"
GEN_B = "/nix/store/" + "b" * 32 + "-nixos-system-web-01"


def env(cp: ControlPlane) -> dict[str, str]:
    return {"NIXFLEET_CONTROL_PLANE_URL": cp.url, "NIXFLEET_API_KEY": cp.admin_key}


def seed(cp: ControlPlane) -> None:
    t1 = cp.register("web-01", ["prod"])
    t2 = cp.register("web-02", ["staging"])
    cp.register("db-01", ["prod", "db"])
    Client(cp.url, t1).report("web-01", {"current_generation": GEN_A, "tags": ["web"]})
    Client(cp.url, t2).report("web-02", {"current_generation": GEN_A, "tags": ["web"]})
    cp.set_desired("web-01", GEN_A)
    cp.set_desired("web-02", GEN_B)


def test_status_table_and_summary(control_plane: ControlPlane) -> None:
    seed(control_plane)
    r = run_cli("status", env=env(control_plane))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == [
        "HOST",
        "LIFECYCLE",
        "CURRENT",
        "DESIRED",
        "SYNC",
        "HEALTH",
        "LAST",
        "REPORT",
        "TAGS",
    ]
    rows = {line.split()[0]: line for line in lines[1:4]}
    assert set(rows) == {"db-01", "web-01", "web-02"}
    assert "aaaaaaa-nixos-system-web-01" in rows["web-01"] and "in sync" in rows["web-01"]
    assert "bbbbbbb-nixos-system-web-01" in rows["web-02"] and "updating" in rows["web-02"]
    assert "no desired" in rows["db-01"] and "never" in rows["db-01"]
    assert re.search(r"\d+s ago", rows["web-01"])
    assert "prod,web" in rows["web-01"]
    assert "\x1b[" not in r.stdout  # not a TTY: no colour
    assert lines[-1] == "1/3 machines in sync, 1 updating, 1 no desired"  # no health checks
    wide = run_cli("status", "--wide", env=env(control_plane))
    assert GEN_A in wide.stdout


def test_status_json_has_full_paths_and_rfc3339_times(control_plane: ControlPlane) -> None:
    seed(control_plane)
    r = run_cli("status", "--json", env=env(control_plane))
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    by_id = {m["id"]: m for m in data["machines"]}
    assert by_id["web-01"]["current_generation"] == GEN_A
    assert by_id["web-02"]["desired_generation"] == GEN_B
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", by_id["web-01"]["last_report_at"]
    )
    assert data["summary"]["total"] == 3
    # The global flag gives the same document.
    again = json.loads(run_cli("--json", "status", env=env(control_plane)).stdout)
    assert again["machines"] == data["machines"] and again["summary"] == data["summary"]


def test_machines_list_filters_by_all_tags(control_plane: ControlPlane) -> None:
    seed(control_plane)

    def ids(*args: str) -> list[str]:
        r = run_cli("machines", "list", *args, "--json", env=env(control_plane))
        assert r.returncode == 0, r.stderr
        return [m["id"] for m in json.loads(r.stdout)["machines"]]

    assert ids("--tags", "prod") == ["db-01", "web-01"]
    assert ids("--tags", "web") == ["web-01", "web-02"]
    assert ids("--tags", "prod,web") == ["web-01"]
    assert ids("--lifecycle", "pending") == ["db-01"]
    table = run_cli("machines", "list", "--tags", "prod", env=env(control_plane))
    assert table.stdout.splitlines()[0].split()[:2] == ["HOST", "LIFECYCLE"]
    assert "2 machine(s)" in table.stderr


def test_lifecycle_commands_and_exit_codes(control_plane: ControlPlane) -> None:
    e = env(control_plane)
    r = run_cli("machines", "register", "web-03", "--tags", "prod,web", env=e)
    assert r.returncode == 0 and "registered web-03" in r.stderr
    r = run_cli("machines", "register", "web-03", env=e)
    assert r.returncode == 4 and "already registered" in r.stderr
    r = run_cli("machines", "set-lifecycle", "web-03", "maintenance", env=e)
    assert r.returncode == 4
    assert "cannot go from pending to maintenance" in r.stderr
    assert "allowed from pending: active, decommissioned, provisioning" in r.stderr
    assert run_cli("machines", "set-lifecycle", "web-03", "provisioning", env=e).returncode == 0
    assert run_cli("machines", "set-lifecycle", "ghost", "active", env=e).returncode == 3
    assert run_cli("machines", "set-lifecycle", "web-03", "bogus", env=e).returncode == 2
    assert run_cli("machines", "tag", "web-03", "canary", env=e).returncode == 0
    assert run_cli("machines", "untag", "web-03", "prod", env=e).returncode == 0
    shown = json.loads(run_cli("machines", "show", "web-03", "--json", env=e).stdout)
    assert shown["lifecycle"] == "provisioning" and shown["tags"] == ["canary", "web"]
    r = run_cli("machines", "set-desired", "web-03", GEN_A, env=e)
    assert r.returncode == 0
    assert run_cli("machines", "clear-desired", "web-03", env=e).returncode == 0
    r = run_cli("machines", "set-desired", "web-03", "/tmp/nope", env=e)
    assert r.returncode == 7 and "store_path" in r.stderr
    token = run_cli("machines", "register", "web-04", "--issue-token", env=e).stdout.strip()
    assert token.startswith("nfm_")


def test_missing_or_wrong_credentials_exit_6(control_plane: ControlPlane) -> None:
    r = run_cli("status", env={"NIXFLEET_CONTROL_PLANE_URL": control_plane.url})
    assert r.returncode == 6 and "credentials required" in r.stderr
    r = run_cli("--control-plane-url", control_plane.url, "--api-key", "nfk_wrong", "status")
    assert r.returncode == 6


def test_control_plane_down_exits_5_with_guidance(control_plane: ControlPlane) -> None:
    seed(control_plane)
    control_plane.stop()
    for args in (("status",), ("machines", "list", "--tags", "prod"), ("status", "--json")):
        r = run_cli(*args, env=env(control_plane))
        assert r.returncode == 5, (args, r.stderr)
        assert r.stdout == ""
        assert "unreachable" in r.stderr
        assert "keep running their last-known generation" in r.stderr
        assert "no new deployments" in r.stderr
        assert "ssh root@<host>" in r.stderr
        assert "nixos-rebuild list-generations" in r.stderr and "systemctl status" in r.stderr
    # Nothing was listening at all: same answer.
    r = run_cli("status", env={"NIXFLEET_CONTROL_PLANE_URL": f"http://127.0.0.1:{free_port()}"})
    assert r.returncode == 5


def test_sigterm_keeps_every_acknowledged_write(control_plane: ControlPlane) -> None:
    token = control_plane.register("web-01")
    agent = Client(control_plane.url, token)
    for i in range(20):  # each a change (a switch), so each one is a history event
        gen = GEN_A if i % 2 == 0 else GEN_B
        agent.report("web-01", {"current_generation": gen, "message": f"poll {i}"})
    control_plane.stop()  # SIGTERM
    assert "stopped" in control_plane.log.read_text()
    control_plane.start()
    m = control_plane.machine("web-01")
    assert m["last_message"] == "poll 19"
    switches = [e["generation"] for e in m["history"] if e["kind"] == "generation"]
    assert len(switches) == 20 and switches[-3:] == [GEN_B, GEN_A, GEN_B]


def test_usage_errors_exit_2() -> None:
    assert run_cli("machines", "list", "--lifecycle", "nope").returncode == 2
    assert run_cli("no-such-command").returncode == 2
    r = run_cli("--help")
    assert r.returncode == 0 and "Example:" in r.stdout


def test_agent_messages_cannot_drive_the_operators_terminal(control_plane: ControlPlane) -> None:
    token = control_plane.register("web-01")
    evil = "deployed\x1b[2J\x1b]0;pwned\x07\rdone"
    agent = Client(control_plane.url, token)
    with pytest.raises(ValidationError):  # the CP refuses control characters (issue 14)
        agent.report("web-01", {"current_generation": GEN_A, "message": evil})
    # Text stored before that (an older CP) is still rendered harmlessly.
    agent.report("web-01", {"current_generation": GEN_A, "message": "placeholder"})
    db = Store(control_plane.db)
    with db.transaction() as conn:
        conn.execute("UPDATE machines SET last_message = ? WHERE id = 'web-01'", (evil,))
    db.close()
    for args in (("machines", "show", "web-01"), ("status",)):
        r = run_cli(*args, env=env(control_plane))
        assert r.returncode == 0, r.stderr
        assert "\x1b" not in r.stdout and "\x07" not in r.stdout and "\r" not in r.stdout
    shown = run_cli("machines", "show", "web-01", env=env(control_plane)).stdout
    assert "deployed\\x1b[2J" in shown
    # JSON output keeps the exact text (escaped by JSON itself).
    data = json.loads(
        run_cli("machines", "show", "web-01", "--json", env=env(control_plane)).stdout
    )
    assert data["last_message"] == evil


def test_backup_while_running_is_a_consistent_copy(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    token = control_plane.register("web-01", ["prod"])
    Client(control_plane.url, token).report("web-01", {"current_generation": GEN_A})
    target = tmp_path / "backup.db"
    cmd = [sys.executable, "-m", "nixfleet.controlplane.main", "--db", str(control_plane.db)]
    done = subprocess.run(
        [*cmd, "backup", str(target)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    copy = Store(target)
    with copy.read() as conn:
        (m,) = machines.list_machines(conn)
    copy.close()
    assert (m.id, m.current_generation, m.tags) == ("web-01", GEN_A, ("prod",))
    again = subprocess.run(
        [*cmd, "backup", str(target)], capture_output=True, text=True, check=False
    )
    assert again.returncode == 1 and "exists" in again.stderr


def test_config_file_supplies_url_and_key_file(control_plane: ControlPlane, tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(control_plane.admin_key + "\n")
    key_file.chmod(0o600)
    config = tmp_path / "config.toml"
    config.write_text(f'control_plane_url = "{control_plane.url}"\napi_key_file = "{key_file}"\n')
    r = run_cli("status", "--json", env={"NIXFLEET_CONFIG": str(config)})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["summary"]["total"] == 0
    # The environment beats the file.
    r = run_cli(
        "status",
        env={
            "NIXFLEET_CONFIG": str(config),
            "NIXFLEET_CONTROL_PLANE_URL": f"http://127.0.0.1:{free_port()}",
        },
    )
    assert r.returncode == 5
    key_file.chmod(0o644)
    r = run_cli("status", env={"NIXFLEET_CONFIG": str(config)})
    assert r.returncode == 2 and "chmod 600" in r.stderr


@pytest.mark.parametrize("collecting", [True, False])
def test_status_leaves_the_cyclic_collector_as_it_was(
    control_plane: ControlPlane, monkeypatch: pytest.MonkeyPatch, collecting: bool
) -> None:
    """`status` pauses the collector for its one answer, in this process too."""
    import gc

    from nixfleet.cli.main import run

    control_plane.register("web-01", ["web"])
    monkeypatch.setenv("NIXFLEET_CONTROL_PLANE_URL", control_plane.url)
    monkeypatch.setenv("NIXFLEET_API_KEY", control_plane.admin_key)
    was = gc.isenabled()
    (gc.enable if collecting else gc.disable)()
    try:
        assert run(["status", "--json"]) == 0
        assert gc.isenabled() is collecting
    finally:
        (gc.enable if was else gc.disable)()
