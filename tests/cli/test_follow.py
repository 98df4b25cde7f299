"""`rollout status --wait` in a CI log: the view once, then one line per change."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CliResult, ControlPlane, new_control_plane

from nixfleet.client import Client

HOSTS = ["web-01", "web-02", "web-03"]


def gen(host: str, salt: str) -> str:
    return f"/nix/store/{salt * 32}-nixos-system-{host}"


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ControlPlane]:
    plane = new_control_plane(tmp_path / "cp", "--reconcile-interval", "0.1")
    plane.start()
    yield plane
    plane.stop()


def agents(cp: ControlPlane, stop: threading.Event) -> threading.Thread:
    """Agents that switch to whatever is desired, polling every 0.1 s."""
    clients = {h: Client(cp.url, cp.register(h, ["web"])) for h in HOSTS}
    current = {h: gen(h, "o") for h in HOSTS}

    def loop() -> None:
        while not stop.is_set():
            for h, c in clients.items():
                desired = c.report(h, {"current_generation": current[h]})["desired_generation"]
                if desired:
                    current[h] = desired
            stop.wait(0.1)

    for h, c in clients.items():
        c.report(h, {"current_generation": current[h]})
    return threading.Thread(target=loop, daemon=True)


def test_wait_not_on_a_terminal_prints_changes_not_tables(cp: ControlPlane) -> None:
    stop = threading.Event()
    thread = agents(cp, stop)
    client = cp.client()
    rel = client.register_release(
        {
            "entries": [
                {"hostname": h, "store_path": gen(h, "n"), "platform": "x86_64-linux", "tags": []}
                for h in HOSTS
            ]
        }
    )
    client.apply_rollout(
        {
            "version": 1,
            "name": "web",
            "release": rel["id"],
            "target": {"tags": ["web"]},
            "strategy": "staged",
            "batches": [1, "100%"],
            "health_timeout": "5m",
        }
    )
    env = {"NIXFLEET_CONTROL_PLANE_URL": cp.url, "NIXFLEET_API_KEY": cp.admin_key}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nixfleet.cli",
            "rollout",
            "status",
            "web",
            "--wait",
            "--interval",
            "0.05",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("NIXFLEET_")} | env,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()  # the view is on screen: now let the machines move
    thread.start()
    try:
        rest, err = proc.communicate(timeout=120)
    finally:
        stop.set()
        thread.join(timeout=10)
    r = CliResult(proc.returncode, first + rest, err)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert sum(line.startswith("rollout web (") for line in lines) == 1  # one view
    changes = [line for line in lines if re.match(r"\d\d:\d\d:\d\d  ", line)]
    said = [line.split("  ", 1)[1] for line in changes]
    assert len(said) == len(set(said)), said  # each change once, never a repeat
    assert said[-1] == "rollout web: completed"
    for host in HOSTS:
        assert f"{host}: healthy" in said or any(
            line.split()[:2] == [host, "healthy"] for line in lines
        )
    # ~dozens of polls happened; the output stayed a handful of lines.
    assert len(lines) < 30, r.stdout
