"""The confirm window for real: agent and control plane in network namespaces of their own.

The test makes two namespaces joined by a veth pair on a private /30 (nothing else is
reachable from either), runs the real control plane in one and the real agent in
the other, and deploys fake generations whose switch script edits the agent side's
routes, as a broken NixOS network configuration would. The test talks to the control
plane through a small client process inside the CP's namespace.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nixfleet_test_fakes as fakes  # loaded by conftest from tests/nix/fakes.py
import pytest
from conftest import wait_until as conftest_wait_until

from nixfleet.models import utcnow
from nixfleet.store import Store, credentials

pytestmark = pytest.mark.nix  # real Nix: also run under the other Debian's Nix (tests/system)

MID = "web-01"
CP_ADDR, AGENT_ADDR, NET = "10.213.7.1", "10.213.7.2", "10.213.7.0/30"
PORT = 8470


def require_netns() -> None:
    problems = []
    if os.geteuid() != 0:
        problems.append("it needs root (ip netns add)")
    if shutil.which("ip") is None:
        problems.append("ip is missing (apt-get install iproute2)")
    if not problems:
        return
    message = "the confirm-window test cannot run here: " + "; ".join(problems)
    if os.environ.get("NIXFLEET_CI") == "1":
        pytest.fail(message + " — under CI (NIXFLEET_CI=1) this is an error, not a skip")
    pytest.skip(message)


def ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def wait_until(what: str, predicate: Callable[[], Any], timeout: float = 60.0) -> Any:
    return conftest_wait_until(what, predicate, timeout, interval=0.2)


@dataclass
class Net:
    cp: str  # namespace names
    agent: str
    agent_dev: str

    def routes(self) -> str:
        return ip("-n", self.agent, "route", "show")


@pytest.fixture
def net() -> Iterator[Net]:
    require_netns()
    tag = secrets.token_hex(3)
    n = Net(cp=f"nf-cp-{tag}", agent=f"nf-ag-{tag}", agent_dev=f"nfa{tag}")
    cp_dev = f"nfc{tag}"
    ip("netns", "add", n.cp)
    try:
        ip("netns", "add", n.agent)
        ip("link", "add", cp_dev, "type", "veth", "peer", "name", n.agent_dev)
        ip("link", "set", cp_dev, "netns", n.cp)
        ip("link", "set", n.agent_dev, "netns", n.agent)
        for ns, dev, addr in ((n.cp, cp_dev, CP_ADDR), (n.agent, n.agent_dev, AGENT_ADDR)):
            ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield n
    finally:
        for ns in (n.agent, n.cp):  # deleting a namespace deletes its end of the veth
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


# A line-per-request JSON client living in the CP's namespace: [method, path, body] in,
# [status, answer] out (status 0: no answer, the control plane is down).
API_HELPER = """
import json, sys
from nixfleet.client import Client
from nixfleet.errors import NixfleetError
url, key = sys.argv[1], sys.argv[2]
for line in sys.stdin:
    method, path, body = json.loads(line)
    client = Client(url, key, timeout=5)
    try:
        out = [200, client.request(method, path, body)]
    except NixfleetError as e:
        out = [0 if type(e).__name__ == "UnreachableError" else 400, str(e)]
    finally:
        client.close()
    print(json.dumps(out), flush=True)
"""


class Fleet:
    """The control plane (in net.cp) and one agent (in net.agent), as processes."""

    def __init__(self, net: Net, machine: Any, tmp_path: Path) -> None:
        self.net, self.machine, self.tmp = net, machine, tmp_path
        self.db = tmp_path / "cp" / "nixfleet.db"
        self.db.parent.mkdir()
        store = Store(self.db)
        with store.transaction() as conn:
            self.key = credentials.create_key(conn, "test-admin", "admin", "test", utcnow())
        store.close()
        self.url = f"http://{CP_ADDR}:{PORT}"
        self.cp: subprocess.Popen[bytes] | None = None
        self.agent: subprocess.Popen[bytes] | None = None
        self.agent_log = tmp_path / "agent.log"
        self.api_proc = subprocess.Popen(
            ["ip", "netns", "exec", net.cp, sys.executable, "-c", API_HELPER, self.url, self.key],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def api(self, method: str, path: str, body: Any = None) -> Any:
        assert self.api_proc.stdin is not None and self.api_proc.stdout is not None
        self.api_proc.stdin.write(json.dumps([method, path, body]) + "\n")
        self.api_proc.stdin.flush()
        status, answer = json.loads(self.api_proc.stdout.readline())
        if status != 200:
            raise AssertionError(f"{method} {path}: {answer}")
        return answer

    def reachable(self) -> bool:
        try:
            self.api("GET", "/health")
        except AssertionError:
            return False
        return True

    def start_cp(self) -> None:
        log = (self.tmp / "cp" / "cp.log").open("ab")
        self.cp = subprocess.Popen(
            ["ip", "netns", "exec", self.net.cp, sys.executable, "-m", "nixfleet.controlplane.main",
             "--db", str(self.db), "--listen", f"{CP_ADDR}:{PORT}", "--reconcile-interval", "0.2"],
            stdout=log, stderr=log,
        )  # fmt: skip
        wait_until("the control plane to serve", self.reachable, timeout=30)

    def stop_cp(self) -> None:
        assert self.cp is not None
        self.cp.terminate()
        self.cp.wait(timeout=30)
        self.cp = None

    def start_agent(self) -> None:
        token = self.api("POST", "/api/v1/machines", {"id": MID, "issue_token": True})["token"]
        token_file = self.tmp / "token"
        token_file.write_text(token + "\n")
        config = self.tmp / "agent.json"
        config.write_text(
            json.dumps(
                {
                    "control_plane_url": self.url,
                    "allow_insecure": True,  # plain HTTP to a non-loopback test address
                    "machine_id": MID,
                    "token_file": str(token_file),
                    "profile": str(self.machine.profile),
                    "current_system": str(self.machine.current_system),
                    "state_dir": str(self.machine.state_dir),
                    "poll_interval": 1,
                    "backoff_initial": 0.2,
                    "backoff_max": 1,
                }
            )
        )
        env = fakes.nix_env(NIXFLEET_SWITCH_LOG=str(self.machine.switch_log))
        self.agent = subprocess.Popen(
            ["ip", "netns", "exec", self.net.agent, sys.executable, "-m", "nixfleet.agent.main",
             "--config", str(config)],
            stdout=subprocess.DEVNULL, stderr=self.agent_log.open("ab"), env=env,
        )  # fmt: skip

    def machine_state(self) -> dict[str, Any]:
        m: dict[str, Any] = self.api("GET", f"/api/v1/machines/{MID}")
        return m

    def deploy(self, generation: str, confirm_timeout: str, name: str) -> str:
        release = self.api(
            "POST",
            "/api/v1/releases",
            {
                "flake_ref": "path:/fleet",
                "flake_rev": "0" * 40,
                "cache_url": "https://cache.invalid",
                "entries": [
                    {"hostname": MID, "store_path": generation, "platform": "x86_64-linux"}
                ],
            },
        )
        doc = {
            "version": 1,
            "name": name,
            "release": release["id"],
            "target": {"hosts": [MID]},
            "strategy": "all-at-once",
            "health_timeout": "1h",
            "confirm_timeout": confirm_timeout,
        }
        rollout_id: str = self.api("POST", "/api/v1/rollouts", doc)["id"]
        return rollout_id

    def close(self) -> None:
        for proc in (self.agent, self.cp):
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self.api_proc.stdin is not None:
            self.api_proc.stdin.close()
        self.api_proc.wait(timeout=30)


@pytest.fixture
def fleet(net: Net, machine: Any, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(net, machine, tmp_path)
    try:
        f.start_cp()
        yield f
    finally:
        f.close()


def install_base(fleet: Fleet, machine: Any) -> str:
    """Generation 1; its switch (re)makes the route to the CP, as a good config would."""
    base: str = fakes.build_system(
        "confirm-base", extra=f"ip route replace {NET} dev {fleet.net.agent_dev}"
    )
    machine.install(base)
    fleet.start_agent()
    wait_until("the agent's first report", lambda: fleet.machine_state()["current_generation"])
    return base


def test_a_switch_that_cuts_the_machine_off_rolls_back_within_the_window(
    fleet: Fleet, machine: Any
) -> None:
    base = install_base(fleet, machine)
    assert NET in fleet.net.routes()
    cut = fakes.build_system("confirm-cut", extra=f"ip route del {NET} dev {fleet.net.agent_dev}")
    rollout_id = fleet.deploy(cut, "4s", "cut")

    m = wait_until(
        "the rollback to be reported",
        lambda: (s := fleet.machine_state())["failed_generation"] == cut and s,
    )
    assert m["current_generation"] == base
    assert m["last_success"] is False
    assert m["last_message"] == "rolled back: no confirmation from the control plane within 4s"
    assert machine.current == base == machine.profile_target
    assert machine.switches() == [f"switch {cut}", f"switch {base}"]
    assert NET in fleet.net.routes(), "the previous generation's switch brought the route back"
    assert not (machine.state_dir / "confirm.json").exists()

    # The CP records a failure of that generation: the rollout's health gate says so.
    def unhealthy() -> dict[str, Any] | None:
        r = fleet.api("GET", f"/api/v1/rollouts/{rollout_id}")
        (entry,) = r["batches"][0]["machines"]
        return entry if entry["health"] == "unhealthy" else None

    entry = wait_until("the health gate to judge the machine", unhealthy)
    assert "no confirmation from the control plane within 4s" in entry["reason"]

    # No retry, as for any failed generation: reports go on, the switch log stays.
    seen = m["last_report_at"]
    for _ in range(2):
        seen = wait_until(
            "another report",
            lambda: (t := fleet.machine_state()["last_report_at"]) != seen and t,  # noqa: B023
        )
    assert machine.switches() == [f"switch {cut}", f"switch {base}"]
    assert fleet.machine_state()["failed_generation"] == cut


def test_b_an_outage_after_the_confirmation_never_rolls_back(fleet: Fleet, machine: Any) -> None:
    install_base(fleet, machine)
    good = fakes.build_system("confirm-good")
    fleet.deploy(good, "3s", "good")
    wait_until(
        "the switch to be confirmed",
        lambda: (
            fleet.machine_state()["current_generation"] == good
            and not (machine.state_dir / "confirm.json").exists()
        ),
    )
    fleet.stop_cp()
    stopped_at = fleet.agent_log.read_text().count("control plane unreachable")

    def failed_polls() -> int:
        return fleet.agent_log.read_text().count("control plane unreachable") - stopped_at

    # At most one poll a second (backoff_max 1): ten failed polls span well over 3 s.
    wait_until("ten failed polls while the CP is down", lambda: failed_polls() >= 10)
    assert machine.current == good
    assert machine.switches() == [f"switch {good}"]
    assert "rolling back" not in fleet.agent_log.read_text()

    fleet.start_cp()
    m = wait_until(
        "a report after the CP is back",
        lambda: (s := fleet.machine_state())["last_message"] == f"deployed {good}" and s,
    )
    assert m["current_generation"] == good and m["last_success"] is True
    assert machine.switches() == [f"switch {good}"]
