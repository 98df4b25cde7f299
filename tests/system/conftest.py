"""Fixtures of the system tier: the cached Debian root, the project installed in it.

See docs/system-tests.md. Everything here needs root and systemd-nspawn; what is
missing is reported by container.require_capabilities (skip, or fail under CI).
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import load_file

HERE = Path(__file__).resolve().parent
container = load_file("nixfleet_test_container", HERE / "container.py")
units = load_file("nixfleet_test_units", HERE.parent / "nix" / "units.py")


@pytest.fixture(scope="session")
def system_suite() -> str:
    """The containers' Debian release: the other one than this machine's (or forced)."""
    suite: str = container.container_suite()
    return suite


@pytest.fixture(scope="session")
def system_root(system_suite: str) -> Path:
    """The one cached root both test files boot: its Nix is the tier's second Nix."""
    container.require_capabilities()
    root: Path = container.rootfs(system_suite)
    return root


@pytest.fixture(scope="session")
def system_venv(system_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cached dependencies plus this tree's wheel, to bind at container.VENV."""
    venv: Path = container.session_env(system_root, tmp_path_factory.mktemp("system-env"))
    return venv


@pytest.fixture(scope="session")
def nix_conf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("nix-conf") / "nix.conf"
    path.write_text(container.NIX_CONF)
    return path


_PREBUILD: list[subprocess.Popen[bytes]] = []


def pytest_collection_finish(session: pytest.Session) -> None:
    """When the tier's tests are selected, start building its root right away (in
    the background, while the rest of the suite runs before them)."""
    if session.config.option.collectonly or not any(
        item.get_closest_marker("system") for item in session.items
    ):
        return
    log = Path(tempfile.gettempdir()) / f"nixfleet-make-rootfs-{os.getpid()}.log"
    proc = container.prebuild(container.container_suite(), log)
    if proc is not None:
        _PREBUILD.append(proc)


def pytest_unconfigure(config: pytest.Config) -> None:
    for proc in _PREBUILD:  # a session cut short leaves no build behind
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
