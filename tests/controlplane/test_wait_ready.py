"""`nixfleet-control-plane wait-ready`: the NixOS unit's ExecStartPost probe of GET /ready."""

from __future__ import annotations

import subprocess
import sys
import time

from conftest import ControlPlane
from ports import free_port

PROGRAM = [sys.executable, "-m", "nixfleet.controlplane.main"]


def _wait_ready(port: int, timeout: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run(
        [*PROGRAM, "--listen", f"127.0.0.1:{port}", "wait-ready", "--timeout", timeout],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done, time.monotonic() - started


def test_ready_control_plane_exits_0(control_plane: ControlPlane) -> None:
    done, _ = _wait_ready(control_plane.port, "10")
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().endswith(f"127.0.0.1:{control_plane.port} is ready")


def test_nothing_listening_exits_5_at_the_timeout_naming_what_was_reached() -> None:
    done, took = _wait_ready(free_port(), "1")
    assert done.returncode == 5, done.stderr
    assert "not ready within 1 s" in done.stderr and "ConnectionRefusedError" in done.stderr
    assert 0.9 < took < 10
    assert "Traceback" not in done.stderr


def test_a_control_plane_that_cannot_write_is_not_ready(control_plane: ControlPlane) -> None:
    """Alive (/health 200) but its database file deleted: /ready's 503 detail is the answer."""
    control_plane.db.unlink()
    done, _ = _wait_ready(control_plane.port, "1")
    assert done.returncode == 5, done.stderr
    assert "last: 503" in done.stderr and "deleted" in done.stderr
