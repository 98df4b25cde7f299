"""DESIGN §11 end to end: the real control plane, real agents (`nixfleet-agent --once`)
on real Nix, fake machines whose reboot command "boots" the current system.

- a kernel-changing release reboots at most `reboot_slots` machines at once and every
  machine ends healthy on the new booted generation;
- a machine that never comes back from its reboot fails its batch once its lease
  expires, and the lease is freed;
- a rollout applied outside its maintenance window starts nothing until the
  (test-controlled) clock enters it.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nixfleet_test_fakes as fakes  # loaded by conftest from tests/nix/fakes.py
import pytest
from conftest import ControlPlane, new_control_plane
from conftest import wait_until as conftest_wait_until

from nixfleet.store import Store

pytestmark = pytest.mark.nix  # real Nix: also run under the other Debian's Nix (tests/system)


def wait_for(what: str, predicate: Callable[[], Any], timeout: float = 60.0) -> Any:
    return conftest_wait_until(what, predicate, timeout, interval=0.1)


@pytest.fixture
def make_cp(tmp_path: Path) -> Iterator[Callable[..., ControlPlane]]:
    started: list[ControlPlane] = []

    def make(**settings: Any) -> ControlPlane:
        cp = new_control_plane(tmp_path / "cp", "--reconcile-interval", "0.2", settings=settings)
        cp.start()
        started.append(cp)
        return cp

    yield make
    for cp in started:
        cp.stop()


class Box:
    """One fake machine with its agent: profile, current and booted links, state dir."""

    def __init__(self, root: Path, name: str, cp: ControlPlane, cache: Any, tags: list[str]):
        self.name, self.cp = name, cp
        self.root = root / name
        self.root.mkdir(parents=True)
        self.profile = self.root / "profiles" / "system"
        self.profile.parent.mkdir()
        self.current = self.root / "current-system"
        self.booted = self.root / "booted-system"
        self.reboots = self.root / "reboots.log"
        self.token = self.root / "token"
        self.token.write_text(cp.register(name, tags) + "\n")
        reboot = self.root / "fake-reboot"
        # A reboot: note it, then the machine comes up on the current system.
        reboot.write_text(
            f'#!/bin/sh\necho reboot >> {self.reboots}\nln -sfn "$(readlink -f {self.current})" {self.booted}\n'
        )
        reboot.chmod(reboot.stat().st_mode | stat.S_IXUSR)
        self.config = self.root / "agent.json"
        self.config.write_text(
            json.dumps(
                {
                    "control_plane_url": cp.url,
                    "machine_id": name,
                    "token_file": str(self.token),
                    "tags": tags,
                    "profile": str(self.profile),
                    "current_system": str(self.current),
                    "booted_system": str(self.booted),
                    "reboot_command": [str(reboot)],
                    "state_dir": str(self.root / "state"),
                    "trusted_public_keys": [cache.public_key],
                }
            )
        )

    def install(self, path: str) -> None:
        fakes.run("nix-env", "-p", self.profile, "--set", path)
        os.symlink(path, self.current)
        os.symlink(path, self.booted)

    def once(self) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "nixfleet.agent.main", "--config", str(self.config), "--once"],
            capture_output=True,
            text=True,
            env=fakes.nix_env(),
            timeout=120,
            check=False,
        )
        with (self.root / "agent.log").open("a") as f:
            f.write(proc.stderr)
        return proc

    @property
    def booted_path(self) -> str:
        return os.path.realpath(self.booted)

    @property
    def reboot_count(self) -> int:
        return len(self.reboots.read_text().splitlines()) if self.reboots.exists() else 0


def release_and_rollout(
    cp: ControlPlane, hosts: list[str], path: str, cache: Any, **doc: Any
) -> str:
    admin = cp.client()
    rel = admin.post(
        "/api/v1/releases",
        {
            "cache_url": cache.url,
            "entries": [
                {"hostname": h, "store_path": path, "platform": "x86_64-linux"} for h in hosts
            ],
        },
    )
    body = {
        "version": 1,
        "name": "kernel",
        "release": rel["id"],
        "target": {"hosts": hosts},
        "strategy": "all-at-once",
        "reboot": "when-needed",
        "health_timeout": "10m",
        **doc,
    }
    return str(admin.post("/api/v1/rollouts", body)["id"])


def leases_held(cp: ControlPlane) -> list[str]:
    s = Store(cp.db)
    try:
        with s.read() as conn:
            return [r[0] for r in conn.execute("SELECT machine_id FROM reboot_leases")]
    finally:
        s.close()


def rollout_state(cp: ControlPlane, rid: str) -> dict[str, Any]:
    data: dict[str, Any] = cp.client().get(f"/api/v1/rollouts/{rid}")
    return data


def test_a_kernel_release_reboots_one_at_a_time_and_ends_healthy(
    make_cp: Callable[..., ControlPlane], cache: Any, tmp_path: Path, published: Any
) -> None:
    cp = make_cp(reboot_slots=1)
    old = fakes.build_system("fleet-k1", kernel="k1")
    new = published("fleet-k2", kernel="k2")
    boxes = [Box(tmp_path, f"db-{i}", cp, cache, ["db"]) for i in range(3)]
    for b in boxes:
        b.install(old)
        assert b.once().returncode == 0  # registered, reporting the old generation
    rid = release_and_rollout(cp, [b.name for b in boxes], new, cache)
    wait_for(
        "desired generations",
        lambda: all(cp.machine(b.name)["desired_generation"] == new for b in boxes),
    )
    rounds = 0
    while rollout_state(cp, rid)["status"] == "running":
        rounds += 1
        assert rounds < 40, rollout_state(cp, rid)
        for b in boxes:
            b.once()
            held = leases_held(cp)
            assert len(held) <= 1, held  # never more than the one slot
            rebooted_not_back = [x.name for x in boxes if x.booted_path == new and x.name in held]
            assert len(rebooted_not_back) <= 1
    assert rollout_state(cp, rid)["status"] == "completed", rollout_state(cp, rid)
    for b in boxes:
        m = cp.machine(b.name)
        assert m["current_generation"] == new and m["booted_generation"] == new
        assert m["needs_reboot"] is False
        assert b.reboot_count == 1
    assert leases_held(cp) == []
    kinds = [e["kind"] for e in rollout_state(cp, rid)["events"]]
    assert kinds.count("machine-rebooting") == 3 and kinds.count("machine-rebooted") == 3


def test_a_machine_that_never_comes_back_fails_its_batch_and_frees_the_lease(
    make_cp: Callable[..., ControlPlane], cache: Any, tmp_path: Path, published: Any
) -> None:
    cp = make_cp(reboot_slots=1, reboot_timeout=2)
    old = fakes.build_system("gone-k1", kernel="k1")
    new = published("gone-k2", kernel="k2")
    box = Box(tmp_path, "db-0", cp, cache, ["db"])
    box.install(old)
    assert box.once().returncode == 0
    rid = release_and_rollout(cp, ["db-0"], new, cache)
    wait_for("the desired generation", lambda: cp.machine("db-0")["desired_generation"] == new)
    box.once()  # switches to the new generation; needs a reboot
    box.once()  # takes the lease and "reboots" ... and never runs again
    assert box.reboot_count == 1 and leases_held(cp) == ["db-0"]
    wait_for("the batch to fail", lambda: rollout_state(cp, rid)["status"] == "paused")
    assert leases_held(cp) == []
    d = rollout_state(cp, rid)
    m = d["batches"][0]["machines"][0]
    assert m["health"] == "unhealthy" and "did not come back" in m["reason"]
    assert "reboot-lease-expired" in [e["kind"] for e in d["events"]]


def test_nothing_starts_outside_the_window_until_the_clock_enters_it(
    make_cp: Callable[..., ControlPlane], cache: Any, tmp_path: Path, published: Any
) -> None:
    clock = tmp_path / "clock"
    clock.write_text("2026-12-06T12:00:00Z")  # a Sunday
    cp = make_cp(policy_clock_file=str(clock))
    old = fakes.build_system("win-old")
    new = published("win-new")
    box = Box(tmp_path, "web-0", cp, cache, ["web"])
    box.install(old)
    window = [{"days": ["mon"], "start": "09:00", "end": "12:00", "timezone": "Europe/Berlin"}]
    rid = release_and_rollout(cp, ["web-0"], new, cache, windows=window, reboot="never")
    wait_for("the window hold", lambda: rollout_state(cp, rid)["hold"])
    for _ in range(3):
        assert box.once().returncode == 0
        assert cp.machine("web-0")["desired_generation"] is None
    hold = rollout_state(cp, rid)["hold"]
    assert hold["kind"] == "waiting-for-window" and "2026-12-07T08:00:00" in hold["detail"]
    clock.write_text("2026-12-07T08:00:00Z")  # Monday 09:00 in Berlin
    wait_for("the batch to start", lambda: cp.machine("web-0")["desired_generation"] == new)
    assert box.once().returncode == 0
    assert os.path.realpath(box.current) == new
    wait_for("completion", lambda: rollout_state(cp, rid)["status"] == "completed")


def in_flight(cp: ControlPlane) -> list[str]:
    """Machines given a rollout's generation and not yet judged healthy."""
    s = Store(cp.db)
    try:
        with s.read() as conn:
            return [
                r[0]
                for r in conn.execute(
                    "SELECT rm.machine_id FROM rollout_machines rm "
                    "JOIN machines m ON m.id = rm.machine_id "
                    "WHERE m.desired_generation = rm.store_path AND rm.health != 'healthy'"
                )
            ]
    finally:
        s.close()


def test_two_rollouts_never_exceed_a_fleet_wide_budget(
    make_cp: Callable[..., ControlPlane], cache: Any, tmp_path: Path, published: Any
) -> None:
    cp = make_cp(disruption_budgets=[{"tags": ["db"], "max_in_flight": 1}])
    old = fakes.build_system("budget-old")
    new = published("budget-new")
    boxes = [Box(tmp_path, f"db-{i}", cp, cache, ["db", "eu" if i < 2 else "us"]) for i in range(4)]
    for b in boxes:
        b.install(old)
        assert b.once().returncode == 0
    admin = cp.client()
    rel = admin.post(
        "/api/v1/releases",
        {
            "cache_url": cache.url,
            "entries": [
                {"hostname": b.name, "store_path": new, "platform": "x86_64-linux"} for b in boxes
            ],
        },
    )
    ids = []
    for name, tag in (("eu", "eu"), ("us", "us")):
        doc = {
            "version": 1,
            "name": name,
            "release": rel["id"],
            "target": {"tags": ["db", tag]},
            "strategy": "all-at-once",
        }
        ids.append(admin.post("/api/v1/rollouts", doc)["id"])
    rounds = 0
    while any(rollout_state(cp, r)["status"] == "running" for r in ids):
        rounds += 1
        assert rounds < 60
        for b in boxes:
            assert len(in_flight(cp)) <= 1, in_flight(cp)
            b.once()
            assert len(in_flight(cp)) <= 1, in_flight(cp)
    assert [rollout_state(cp, r)["status"] for r in ids] == ["completed", "completed"]
    assert all(os.path.realpath(b.current) == new for b in boxes)
    kinds = [e["kind"] for r in ids for e in rollout_state(cp, r)["events"]]
    assert "rollout-held-by-budget" in kinds


def test_plan_closures_tell_cost_and_reboot(
    make_cp: Callable[..., ControlPlane], cache: Any, tmp_path: Path
) -> None:
    from conftest import run_cli

    cp = make_cp()
    old = fakes.build_system("plan-k1", kernel="k1")
    same = fakes.build_system("plan-k1b", kernel="k1")
    new = fakes.build_system("plan-k2", kernel="k2")
    for path in (same, new):
        cache.push(path)
    boxes = {name: Box(tmp_path, name, cp, cache, ["db"]) for name in ("db-0", "db-1")}
    for b in boxes.values():
        b.install(old)
        assert b.once().returncode == 0  # reports current and booted generation
    rel = cp.client().post(
        "/api/v1/releases",
        {
            "cache_url": cache.url,
            "entries": [
                {"hostname": "db-0", "store_path": new, "platform": "x86_64-linux"},
                {"hostname": "db-1", "store_path": same, "platform": "x86_64-linux"},
            ],
        },
    )
    doc = tmp_path / "plan.yaml"
    doc.write_text(
        f"version: 1\nname: plan\nrelease: {rel['id']}\ntarget: {{tags: [db]}}\n"
        "strategy: all-at-once\nreboot: when-needed\n"
    )
    env = {"NIXFLEET_CONTROL_PLANE_URL": cp.url, "NIXFLEET_API_KEY": cp.admin_key}
    r = run_cli("rollout", "plan", "-f", str(doc), "--closures", "--json", env=env)
    assert r.returncode == 0, r.stderr
    hosts = json.loads(r.stdout)["hosts"]
    assert hosts["db-0"]["needs_reboot"] is True  # k1 -> k2
    assert hosts["db-1"]["needs_reboot"] is False  # another system, the same kernel
    for h in ("db-0", "db-1"):
        assert isinstance(hosts[h]["download_bytes"], int) and hosts[h]["download_bytes"] > 0
        assert hosts[h]["diff"] is not None
    text = run_cli("rollout", "plan", "-f", str(doc), "--closures", env=env)
    assert text.returncode == 0, text.stderr
    assert "db-0: " in text.stdout and "needs a reboot" in text.stdout
    assert "db-1: " in text.stdout and "no reboot" in text.stdout
