"""README's first command: the demo fleet, end to end, on real Nix and real processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path

import pytest
from conftest import run_cli
from ui.conftest import Browserless

# Runs under both Nix versions (tests/system/test_nix_versions.py).
pytestmark = pytest.mark.nix


def test_demo_converges_catches_the_bad_release_and_stays_explorable(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    r = run_cli("demo", "--machines", "4", "--dir", str(root), "--keep")
    try:
        assert r.returncode == 0, r.stderr[-3000:]
        out = r.stdout + r.stderr
        # The good release went canary-first to completion ...
        assert out.index("batch-started: batch 1") < out.index("rollout-completed")
        assert "4/4 machines in sync" in r.stdout
        # ... the bad one was caught by the canary, rolled back on the machine, paused.
        assert "rolled back: switch to" in out and "rollout-paused" in out
        assert r.stdout.rstrip().endswith("3/4 machines in sync, 1 failed; health: 4 healthy")
        # --keep: the fleet is still there, and the printed commands work.
        env = {
            "NIXFLEET_CONTROL_PLANE_URL": next(
                line.split("=", 1)[1]
                for line in r.stderr.splitlines()
                if "NIXFLEET_CONTROL_PLANE_URL=" in line
            ),
            "NIXFLEET_API_KEY_FILE": str(root / "admin.key"),
        }
        status = json.loads(run_cli("status", "--json", env=env).stdout)
        by_id = {m["id"]: m for m in status["machines"]}
        assert by_id["web-01"]["sync"] == "failed"
        assert by_id["web-01"]["current_generation"].endswith("-nixos-system-web-01-v2")
        assert by_id["web-04"]["current_generation"] == by_id["web-04"]["desired_generation"]
        rollout = json.loads(run_cli("rollout", "status", "demo-v3", "--json", env=env).stdout)
        assert rollout["status"] == "paused"
        # The printed dashboard shows the same fleet: the converged machines, the failed canary.
        url = next(
            line.split()[1] for line in r.stderr.splitlines() if line.startswith("Dashboard:")
        )
        assert url == env["NIXFLEET_CONTROL_PLANE_URL"] + "/ui/"
        browser = Browserless(env["NIXFLEET_CONTROL_PLANE_URL"])
        assert browser.login((root / "admin.key").read_text().strip()).status == 303
        page = browser.get("/ui/").text
        for m in status["machines"]:
            row = page[page.index(f'href="/ui/machines/{m["id"]}"') :].split("</tr>", 1)[0]
            assert f">{m['sync']}</span>" in row, m["id"]
        assert f'id="count-failed"><span class="n">{status["summary"]["failed"]}<' in page
    finally:
        pids = root / "pids"
        for pid in pids.read_text().split() if pids.exists() else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGTERM)


def test_demo_without_nix_says_what_to_install(tmp_path: Path) -> None:
    r = run_cli("demo", env={"PATH": str(tmp_path)})
    assert r.returncode == 1
    assert "apt-get install nix-bin" in r.stderr and "nixos.org/download" in r.stderr
