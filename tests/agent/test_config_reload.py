"""The agent re-reads its config file when it changes (the tags defect, DESIGN §5).

The NixOS module keeps the file at /etc/nixfleet/agent.json, a link each generation
points at its own store file; these tests swap a link the same way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nixfleet_test_fakes as fakes  # loaded by conftest from tests/nix/fakes.py
import pytest

from nixfleet.agent.config import load_config, reload_if_changed

# Runs under both Nix versions (tests/system/test_nix_versions.py).
pytestmark = pytest.mark.nix

BASE = {"control_plane_url": "http://127.0.0.1:9", "machine_id": "web-01"}


def generation(tmp_path: Path, name: str, **doc: Any) -> Path:
    """One generation's config file, and the stable link pointed at it."""
    target = tmp_path / f"{name}.json"
    target.write_text(json.dumps({**BASE, **doc}))
    link = tmp_path / "agent.json"
    tmp = tmp_path / "agent.json.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    tmp.replace(link)  # atomic, as NixOS's /etc activation
    return link


def test_unchanged_file_is_not_reread(tmp_path: Path) -> None:
    link = generation(tmp_path, "one", tags=["prod", "web"])
    config = load_config(link, environ={})
    assert reload_if_changed(config) is None
    assert reload_if_changed(load_config(None, BASE, environ={})) is None


def test_a_new_generation_is_read_and_flags_still_win(tmp_path: Path) -> None:
    link = generation(tmp_path, "one", tags=["prod", "web"], poll_interval=30)
    config = load_config(link, {"poll_interval": 5}, environ={"X": "1"})
    generation(tmp_path, "two", tags=["prod", "api"], poll_interval=30)
    fresh = reload_if_changed(config)
    assert fresh is not None
    assert fresh.tags == ("prod", "api")
    assert fresh.poll_interval == 5.0
    assert fresh.environ == {"X": "1"}
    assert reload_if_changed(fresh) is None


def test_a_broken_new_file_keeps_the_old_config_and_is_reported_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    link = generation(tmp_path, "one", tags=["prod"])
    config = load_config(link, environ={})
    generation(tmp_path, "two", tags=["not a tag!"])
    kept = reload_if_changed(config)
    assert kept is not None and kept.tags == ("prod",)
    assert "keeping the old one" in caplog.text and "tags" in caplog.text
    caplog.clear()
    assert reload_if_changed(kept) is None
    assert caplog.text == ""


def test_a_vanished_file_keeps_the_config(tmp_path: Path) -> None:
    link = generation(tmp_path, "one", tags=["prod"])
    config = load_config(link, environ={})
    link.unlink()
    assert reload_if_changed(config) is None


def test_running_agent_reports_new_tags_after_the_file_changes(
    control_plane: Any, machine: Any, base_system: str, tmp_path: Path
) -> None:
    """A real agent process, never restarted: the next report carries the new tags."""
    token = tmp_path / "token"
    token.write_text(control_plane.register("web-01") + "\n")
    common = {
        "control_plane_url": control_plane.url,
        "token_file": str(token),
        "profile": str(machine.profile),
        "current_system": str(machine.current_system),
        "state_dir": str(machine.state_dir),
        "poll_interval": 1,
    }
    link = generation(tmp_path, "web", tags=["prod", "web"], **common)
    log = tmp_path / "agent.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "nixfleet.agent.main", "--config", str(link)],
        stdout=subprocess.DEVNULL,
        stderr=log.open("a"),
        env=fakes.nix_env(),
    )
    try:
        wait_for_tags(control_plane, {"prod", "web"}, proc, log)
        generation(tmp_path, "api", tags=["prod", "api"], **common)
        wait_for_tags(control_plane, {"prod", "api"}, proc, log)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert "re-read it" in log.read_text()


def wait_for_tags(cp: Any, tags: set[str], proc: subprocess.Popen[bytes], log: Path) -> None:
    """Wait (a deadline against hangs, not a timing assertion) for the CP to show `tags`."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        if set(cp.machine("web-01")["tags"]) == tags:
            return
        time.sleep(0.1)
    raise AssertionError(f"CP never showed tags {tags}:\n{log.read_text()}")


def test_stat_follows_the_link(tmp_path: Path) -> None:
    """Two generations' files may have equal size and mtime (the store sets mtime 1):
    the inode tells them apart."""
    a = generation(tmp_path, "a", tags=["aaa"])
    os.utime(tmp_path / "a.json", (1, 1))
    config = load_config(a, environ={})
    generation(tmp_path, "b", tags=["bbb"])
    os.utime(tmp_path / "b.json", (1, 1))
    assert (tmp_path / "a.json").stat().st_size == (tmp_path / "b.json").stat().st_size
    fresh = reload_if_changed(config)
    assert fresh is not None and fresh.tags == ("bbb",)
