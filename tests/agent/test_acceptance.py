"""The real agent process against the real control plane process and real Nix.

Each test registers a machine, installs a first generation into a fake machine
(profile, current-system link, state dir under tmp), sets a desired generation through
the API, and runs `python -m nixfleet.agent.main` as an operator's systemd unit would.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nixfleet_test_fakes as fakes  # loaded by conftest from tests/nix/fakes.py
import pytest
from conftest import wait_until as wait_for

# Runs under both Nix versions (tests/system/test_nix_versions.py).
pytestmark = pytest.mark.nix

MID = "web-01"


class AgentRunner:
    """Runs the agent for one fake machine against one control plane."""

    def __init__(self, machine: Any, cp: Any, cache: Any, tmp_path: Path) -> None:
        self.machine = machine
        self.cp = cp
        self.cache = cache
        self.token_file = tmp_path / "token"
        self.token_file.write_text(cp.register(MID, tags=["web"]) + "\n")
        self.config_file = tmp_path / "agent.json"
        self.log = tmp_path / "agent.log"
        self.proc: subprocess.Popen[str] | None = None
        self.write_config()

    def write_config(self, **extra: Any) -> None:
        doc = {
            "control_plane_url": self.cp.url,
            "machine_id": MID,
            "token_file": str(self.token_file),
            "tags": ["web", "prod"],
            "profile": str(self.machine.profile),
            "current_system": str(self.machine.current_system),
            "state_dir": str(self.machine.state_dir),
            "trusted_public_keys": [self.cache.public_key],
            "allowed_cache_schemes": ["file"],  # the test caches are file:// directories
            **extra,
        }
        self.config_file.write_text(json.dumps(doc))

    def env(self) -> dict[str, str]:
        return dict(fakes.nix_env(NIXFLEET_SWITCH_LOG=str(self.machine.switch_log)))

    def once(self, *flags: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "nixfleet.agent.main",
                "--config",
                str(self.config_file),
                "--once",
                *flags,
            ],
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=120,
            check=False,
        )
        with self.log.open("a") as f:
            f.write(proc.stderr)
        return proc

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nixfleet.agent.main", "--config", str(self.config_file)],
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("a"),
            text=True,
            env=self.env(),
        )

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.terminate()
        rc = self.proc.wait(timeout=30)
        self.proc = None
        return rc

    def state(self) -> dict[str, Any]:
        m: dict[str, Any] = self.cp.machine(MID)
        return m


@pytest.fixture
def agent(machine: Any, control_plane: Any, cache: Any, tmp_path: Path) -> Iterator[AgentRunner]:
    runner = AgentRunner(machine, control_plane, cache, tmp_path)
    yield runner
    if runner.proc is not None:
        runner.proc.kill()
        runner.proc.wait()


def test_a_fetch_from_signed_cache_switch_and_report(
    agent: AgentRunner, machine: Any, base_system: str, published: Any, cache: Any
) -> None:
    first = agent.once()
    assert first.returncode == 0, first.stderr
    m = agent.state()
    assert m["current_generation"] == base_system
    assert m["lifecycle"] == "active"
    assert set(m["tags"]) >= {"web", "prod"}

    new = published("accept-a")
    assert not fakes.is_valid(new)
    agent.cp.set_desired(MID, new, cache.url)
    run = agent.once()
    assert run.returncode == 0, run.stderr

    assert fakes.is_valid(new)
    assert machine.profile_target == new and machine.current == new
    assert machine.switches() == [f"switch {new}"]
    m = agent.state()
    assert m["current_generation"] == new == m["desired_generation"]
    assert m["sync"] == "in sync"
    assert m["last_success"] is True and m["last_message"] == f"deployed {new}"
    # Converged: another poll changes nothing.
    assert agent.once().returncode == 0
    assert machine.switches() == [f"switch {new}"]


def test_b_failing_switch_rolls_back_reports_and_is_not_retried(
    agent: AgentRunner, machine: Any, base_system: str, published: Any, cache: Any
) -> None:
    bad = published("accept-b", fail=True)
    agent.cp.set_desired(MID, bad, cache.url)

    run = agent.once()

    assert run.returncode == 1
    assert machine.current == base_system == machine.profile_target
    m = agent.state()
    assert m["current_generation"] == base_system
    assert m["failed_generation"] == bad
    assert m["last_success"] is False
    assert m["last_message"].startswith(f"rolled back: switch to {bad} failed")
    assert m["sync"] == "failed"
    switches = [f"switch {bad}", f"switch {base_system}"]
    assert machine.switches() == switches

    for _ in range(2):  # later polls keep reporting the failure, do not re-apply
        assert agent.once().returncode == 0
        assert machine.switches() == switches
        m = agent.state()
        assert m["last_success"] is False and m["failed_generation"] == bad

    # An operator asks for a retry: exactly one more attempt.
    agent.cp.client().post(f"/api/v1/machines/{MID}/retry")
    assert agent.once().returncode == 1
    assert machine.switches() == switches * 2
    assert agent.once().returncode == 0
    assert machine.switches() == switches * 2
    assert machine.current == base_system


def test_c_failing_health_check_rolls_back(
    agent: AgentRunner, machine: Any, base_system: str, published: Any, cache: Any
) -> None:
    marker = f"{machine.current_system}/healthy"
    agent.write_config(
        health_checks={
            "command": [{"name": "marker", "argv": ["test", "-e", marker], "timeout": 10}]
        }
    )
    sick = published("accept-c", healthy=False)
    agent.cp.set_desired(MID, sick, cache.url)

    assert agent.once().returncode == 1

    assert machine.current == base_system == machine.profile_target
    assert machine.switches() == [f"switch {sick}", f"switch {base_system}"]
    m = agent.state()
    assert m["failed_generation"] == sick
    assert m["last_message"].startswith("rolled back: health checks failed: marker: exit 1")
    detail = agent.cp.client().get(f"/api/v1/machines/{MID}")
    latest = detail["history"][-1]
    assert (latest["kind"], latest["generation"]) == ("rolled-back", sick)
    assert latest["detail"]["reason"].startswith("rolled back: health checks failed")
    assert detail["health"]["all_passed"] is True  # the rolled-back system is healthy


@pytest.mark.parametrize("how", ["unsigned", "tampered"])
def test_d_unsigned_and_tampered_closures_are_refused(
    how: str, agent: AgentRunner, machine: Any, base_system: str, cache: Any
) -> None:
    path = fakes.build_system(f"accept-d-{how}")
    if how == "unsigned":
        cache.push(path, sign=False)
    else:
        cache.push(path)
        cache.tamper(path)
    fakes.delete_from_store(path)
    agent.cp.set_desired(MID, path, cache.url)

    assert agent.once().returncode == 1

    assert not fakes.is_valid(path)
    assert machine.current == base_system == machine.profile_target
    assert machine.switches() == []
    assert machine.generations() == ["system-1-link"]
    m = agent.state()
    assert m["current_generation"] == base_system
    assert m["last_success"] is False
    reason = "hash mismatch" if how == "tampered" else fakes.UNTRUSTED
    assert m["last_message"].startswith(f"fetch of {path} failed, nothing activated")
    assert re.search(reason, m["last_message"])


BACKOFF = re.compile(r"control plane unreachable \((\d+) in a row\).*\(back-off ([0-9.]+)s\)")


def test_e_control_plane_down_keeps_generation_backs_off_and_catches_up(
    agent: AgentRunner, machine: Any, base_system: str, published: Any, cache: Any
) -> None:
    agent.write_config(poll_interval=1, backoff_initial=0.05, backoff_max=0.5)
    agent.start()
    wait_for("first report", lambda: agent.state()["current_generation"] == base_system)

    agent.cp.stop()
    wait_for("four failed polls", lambda: len(BACKOFF.findall(agent.log.read_text())) >= 4)
    new = published("accept-e")  # published while the CP is down
    agent.cp.start()
    agent.cp.set_desired(MID, new, cache.url)
    wait_for("deployment after the CP returned", lambda: agent.state()["current_generation"] == new)
    assert agent.stop() == 0  # SIGTERM: clean exit

    log = agent.log.read_text()
    failures = [(int(n), float(b)) for n, b in BACKOFF.findall(log)]
    counts = [n for n, _ in failures]
    assert counts[:4] == [1, 2, 3, 4]
    delays = [b for _, b in failures]
    assert delays[:4] == [0.05, 0.1, 0.2, 0.4]  # exponential ...
    assert max(delays) <= 0.5  # ... capped
    assert "control plane reachable again after" in log
    # No rollback and no switch while the CP was down; only the new deployment after.
    assert machine.switches() == [f"switch {new}"]
    assert "rolled back" not in log
    assert agent.state()["last_message"] == f"deployed {new}"


def test_machine_without_current_system_fetches_desired_then_reports(
    agent: AgentRunner, machine: Any, published: Any, cache: Any
) -> None:
    # Nothing to report yet (the CP requires current_generation): the agent asks for
    # the desired generation read-only, deploys it, and reports once it runs.
    assert agent.once().returncode == 0
    assert agent.state()["last_report_at"] is None
    first = published("accept-first")
    agent.cp.set_desired(MID, first, cache.url)
    assert agent.once().returncode == 0
    assert machine.current == first
    assert agent.state()["current_generation"] == first


def test_dry_run_changes_nothing_and_reports_nothing(
    agent: AgentRunner, machine: Any, base_system: str, published: Any, cache: Any
) -> None:
    new = published("accept-dry")
    agent.cp.set_desired(MID, new, cache.url)
    run = agent.once("--dry-run")
    assert run.returncode == 0, run.stderr
    assert f"dry-run: would fetch {new} from {cache.url}" in run.stderr
    assert not fakes.is_valid(new) and machine.switches() == []
    assert machine.current == base_system
    assert agent.state()["last_report_at"] is None


def test_agent_restarted_mid_switch_concludes_and_reports(
    agent: AgentRunner, machine: Any, base_system: str, published: Any, cache: Any
) -> None:
    target = fakes.build_system("accept-restart")
    # What an agent killed by its own switch leaves: profile set, record in progress,
    # the switch never got to move the current-system link.
    fakes.run("nix-env", "-p", machine.profile, "--set", target)
    machine.state_dir.mkdir()
    (machine.state_dir / "state.json").write_text(
        json.dumps(
            {
                "in_progress": {
                    "generation": target,
                    "previous": base_system,
                    "profile_previous": base_system,
                    "started_at": "2026-01-01T00:00:00Z",
                }
            }
        )
    )
    agent.cp.set_desired(MID, target, None)

    assert agent.once().returncode == 0  # recovery happened; the failed target is not retried

    assert machine.current == base_system == machine.profile_target
    m = agent.state()
    assert m["failed_generation"] == target
    assert m["last_message"] == (
        f"rolled back: activation of {target} was interrupted (agent restarted)"
    )


def test_enrollment_via_credentials_directory(
    machine: Any, control_plane: Any, cache: Any, base_system: str, tmp_path: Path
) -> None:
    created = control_plane.client().post(
        "/api/v1/enroll-tokens", {"uses": 1, "tags": ["enrolled"]}
    )
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "enroll-token").write_text(created["token"] + "\n")
    config = tmp_path / "agent.json"
    config.write_text(
        json.dumps(
            {
                "control_plane_url": control_plane.url,
                "machine_id": "new-01",
                "profile": str(machine.profile),
                "current_system": str(machine.current_system),
                "state_dir": str(machine.state_dir),
            }
        )
    )
    env = fakes.nix_env(CREDENTIALS_DIRECTORY=str(creds))
    argv = [sys.executable, "-m", "nixfleet.agent.main", "--config", str(config), "--once"]

    for _ in range(2):  # the second run uses the stored machine token
        run = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60, check=False)
        assert run.returncode == 0, run.stderr

    token = machine.state_dir / "token"
    assert token.stat().st_mode & 0o777 == 0o600
    m = control_plane.machine("new-01")
    assert m["current_generation"] == base_system and "enrolled" in m["tags"]
    events = control_plane.client().get("/api/v1/machines/new-01")["history"]
    # Two reports: the first is a switch to base_system, the second a heartbeat.
    assert [e["generation"] for e in events if e["kind"] == "generation"] == [base_system]
