"""Coordinated reboots, agent side: real boot links of real Nix systems, a real CP, and a
recording reboot command that "boots" the current system (re-points the booted link)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import nixfleet_test_fakes as fakes  # loaded by conftest from tests/nix/fakes.py
import pytest

from nixfleet.agent import reboot
from nixfleet.agent.reboot import Rebooter
from nixfleet.client import Client
from nixfleet.store import Store

pytestmark = pytest.mark.nix  # real Nix: also run under the other Debian's Nix (tests/system)


@pytest.fixture(scope="module")
def systems() -> dict[str, str]:
    return {
        "k1": fakes.build_system("reboot-k1", kernel="k1"),
        "k1b": fakes.build_system("reboot-k1b", kernel="k1"),
        "k2": fakes.build_system("reboot-k2", kernel="k2"),
        "plain": fakes.build_system("reboot-plain"),
    }


def link(path: Path, target: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, path)


def recording_reboot(tmp_path: Path, booted: Path, current: Path, fail: bool = False) -> list[str]:
    """A reboot command that logs its call and boots the current system (or fails)."""
    log = tmp_path / "reboots.log"
    script = tmp_path / "fake-reboot"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "reboot $*" >> {log}\n'
        + ("echo 'Failed to reboot: access denied' >&2; exit 1\n" if fail else "")
        + f'ln -sfn "$(readlink -f {current})" {booted}\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return [str(script), "--now"]


@pytest.mark.parametrize(
    ("booted", "current", "needed", "changed"),
    [
        ("k1", "k1", False, ()),
        ("k1", "k1b", False, ()),  # another system, same kernel: a switch is enough
        ("k1", "k2", True, ("initrd", "kernel", "kernel-modules")),
        ("plain", "plain", False, ()),
        ("plain", "k2", True, ("initrd", "kernel", "kernel-modules")),
    ],
)
def test_observe_compares_the_three_boot_links(
    systems: dict[str, str], tmp_path: Path, booted: str, current: str, needed: bool, changed: Any
) -> None:
    b, c = tmp_path / "booted-system", tmp_path / "current-system"
    link(b, systems[booted])
    link(c, systems[current])
    state = reboot.observe(b, c)
    assert state.booted_generation == systems[booted]
    assert state.needs_reboot is needed
    assert state.changed == changed
    assert state.report_fields() == {"needs_reboot": needed, "booted_generation": systems[booted]}


def test_no_booted_system_means_no_reboot(systems: dict[str, str], tmp_path: Path) -> None:
    c = tmp_path / "current-system"
    link(c, systems["k2"])
    state = reboot.observe(tmp_path / "missing", c)
    assert state == reboot.BootState(None, False)
    assert state.report_fields() == {"needs_reboot": False}


def setup_rollout(cp: Any, hosts: list[str], store_path: str, **doc: Any) -> str:
    admin = cp.client()
    release = admin.post(
        "/api/v1/releases",
        {
            "entries": [
                {"hostname": h, "store_path": store_path, "platform": "x86_64-linux"} for h in hosts
            ]
        },
    )
    body = {
        "version": 1,
        "name": "kernel",
        "release": release["id"],
        "target": {"hosts": hosts},
        "strategy": "all-at-once",
        "reboot": "when-needed",
        **doc,
    }
    rollout: dict[str, Any] = admin.post("/api/v1/rollouts", body)
    return str(rollout["id"])


def test_lease_reboot_release_against_a_real_control_plane(
    control_plane: Any, systems: dict[str, str], tmp_path: Path
) -> None:
    cp = control_plane
    tokens = {h: cp.register(h, ["db"]) for h in ("db-1", "db-2")}
    rid = setup_rollout(cp, ["db-1", "db-2"], systems["k2"])
    booted, current = tmp_path / "booted-system", tmp_path / "current-system"
    link(booted, systems["k1"])
    link(current, systems["k2"])
    command = recording_reboot(tmp_path, booted, current)
    one = Rebooter("db-1", tmp_path / "state-1", command)
    two = Rebooter("db-2", tmp_path / "state-2", command)
    c1, c2 = Client(cp.url, tokens["db-1"]), Client(cp.url, tokens["db-2"])
    boot = reboot.observe(booted, current)
    k2 = systems["k2"]

    # Not converged or not healthy yet: no lease asked for.
    assert one.step(c1, boot, systems["k1"], k2, wanted=True, healthy=True) == "none"
    assert one.step(c1, boot, k2, k2, wanted=True, healthy=False) == "none"
    assert one.step(c1, boot, k2, k2, wanted=False, healthy=True) == "none"

    assert one.step(c1, boot, k2, k2, wanted=True, healthy=True) == "rebooting"
    assert (tmp_path / "reboots.log").read_text() == "reboot --now\n"
    assert one.holding() is not None
    # The default group has one slot: db-2 waits while db-1 reboots.
    assert two.step(c2, boot, k2, k2, wanted=True, healthy=True) == "waiting"

    after = reboot.observe(booted, current)  # the fake reboot booted k2
    assert after.needs_reboot is False and after.booted_generation == k2
    assert one.step(c1, after, k2, k2, wanted=True, healthy=False) == "holding"
    assert one.step(c1, after, k2, k2, wanted=True, healthy=True) == "released"
    assert one.holding() is None
    assert two.step(c2, boot, k2, k2, wanted=True, healthy=True) == "rebooting"

    store = Store(cp.db)
    with store.read() as conn:
        kinds = [
            (r[0], r[1])
            for r in conn.execute(
                "SELECT kind, machine_id FROM rollout_events WHERE rollout_id = ? ORDER BY id",
                (rid,),
            )
        ]
        holders = [r[0] for r in conn.execute("SELECT machine_id FROM reboot_leases")]
    store.close()
    assert ("machine-rebooting", "db-1") in kinds
    assert ("machine-rebooted", "db-1") in kinds
    assert ("machine-rebooting", "db-2") in kinds
    assert holders == ["db-2"]
    # An agent may only touch its own lease.
    with pytest.raises(Exception) as e:
        c1.release_reboot_lease("db-2")
    assert getattr(e.value, "exit_code", None) == 6


def test_a_failing_reboot_command_keeps_the_lease_and_says_why(
    control_plane: Any, systems: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cp = control_plane
    token = cp.register("db-1", ["db"])
    setup_rollout(cp, ["db-1"], systems["k2"])
    booted, current = tmp_path / "booted-system", tmp_path / "current-system"
    link(booted, systems["k1"])
    link(current, systems["k2"])
    r = Rebooter("db-1", tmp_path / "state", recording_reboot(tmp_path, booted, current, fail=True))
    boot = reboot.observe(booted, current)
    k2 = systems["k2"]
    with Client(cp.url, token) as c:
        assert r.step(c, boot, k2, k2, wanted=True, healthy=True) == "reboot-failed"
        assert "access denied" in caplog.text
        assert json.loads((tmp_path / "state" / reboot.LEASE_FILE).read_text())["generation"] == k2
        # The next cycle retries under the same lease (recursive take).
        assert r.step(c, boot, k2, k2, wanted=True, healthy=True) == "reboot-failed"
    assert (tmp_path / "reboots.log").read_text().count("reboot --now") == 2
