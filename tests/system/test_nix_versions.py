"""Every test marked `nix` again, under the other Debian's Nix (2.26 here on Debian 12).

The machine itself may be Debian 12 (nix-bin 2.8) or 13 (2.26): this tier detects
which, and runs the nix-marked tests in a container of the other release, so both
versions run on every CI machine. The working tree is mounted read-only with a
throw-away overlay on top; the container has its own, empty Nix store.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import nixfleet_test_container as container  # loaded by conftest
import nixfleet_test_units as units  # loaded by conftest
import pytest

pytestmark = pytest.mark.system

# Debian release -> the other one, whose nix-bin the container brings.
OTHER = {"bookworm": "trixie", "trixie": "bookworm"}
RESULTS: list[str] = container.RESULTS  # printed at the end of the session (conftest)


def host_release() -> str:
    text = Path("/etc/os-release").read_text()
    found = re.search(r"^VERSION_CODENAME=(\S+)$", text, re.MULTILINE)
    return found.group(1).strip('"') if found else ""


def host_nix() -> str:
    done = subprocess.run(["nix", "--version"], capture_output=True, text=True, check=False)
    return done.stdout.strip() or "nix: not found"


@pytest.fixture(scope="module")
def other_root(system_root: Path) -> Path:
    suite = OTHER.get(host_release(), "trixie")
    if suite == container.SUITE:
        return system_root
    done = subprocess.run(
        [str(container.HERE / "make-rootfs.sh"), suite],
        capture_output=True, text=True, timeout=1200, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.fail(f"building the {suite} root failed:\n{done.stderr[-4000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def other_venv(other_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv: Path = container.session_env(other_root, tmp_path_factory.mktemp("other-env"))
    return venv


def inner(
    root: Path, venv: Path, nix_conf: Path, lib: str | None, *argv: str, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    """`argv` in a throw-away container: the tree at /src (overlay), nixfleet at VENV."""
    env = {
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "NIXFLEET_CI": os.environ.get("NIXFLEET_CI", ""),
    }
    binds_ro: list[tuple[Path | str, str]] = [(nix_conf, "/etc/nix/nix.conf")]
    if lib is not None:
        binds_ro.append((lib, "/nixpkgs-lib"))
        env.update(NIXFLEET_NIXPKGS_LIB="/nixpkgs-lib", NIXFLEET_REQUIRE_NIXPKGS_LIB="1")
    done: subprocess.CompletedProcess[str] = container.run_once(
        root,
        ["sh", "-c", 'cd /src && exec "$@"', "sh", *argv],
        binds=[(venv, container.VENV)],
        binds_ro=binds_ro,
        overlays=[(container.ROOT, "/src")],
        env=env,
        timeout=timeout,
    )
    return done


def summary(output: str) -> str:
    lines = [ln for ln in output.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
    return lines[-1].strip("= ") if lines else "no summary"


def test_nix_marked_tests_pass_under_the_other_nix(
    other_root: Path, other_venv: Path, nix_conf: Path
) -> None:
    lib = units.nixpkgs_lib()
    version = inner(other_root, other_venv, nix_conf, None, "nix", "--version").stdout.strip()
    assert version, "no nix in the container"
    done = inner(
        other_root, other_venv, nix_conf, lib,
        f"{container.VENV}/bin/python", "-m", "pytest", "-q", "-p", "no:cacheprovider",
        "-m", "nix and not system", "--ignore=tests/ui", "tests",  # ui: browser deps
    )  # fmt: skip
    RESULTS.append(f"{host_nix()} (this machine, {host_release()}): the nix-marked tests above")
    RESULTS.append(f"{version} ({other_root.name}): {summary(done.stdout)}")
    assert done.returncode == 0, f"under {version}:\n{done.stdout[-8000:]}\n{done.stderr[-3000:]}"
    assert " passed" in summary(done.stdout)


SHAPE_TEST = textwrap.dedent(
    '''
    import json, subprocess, tempfile, os

    def test_path_info_is_a_list():
        """Assumes Nix <= 2.18's shape of `nix path-info --json`."""
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write("shape\\n")
        env = {**os.environ, "NIX_CONFIG": "experimental-features = nix-command"}
        path = subprocess.run(["nix-store", "--add", f.name], capture_output=True,
                              text=True, check=True, env=env).stdout.strip()
        out = subprocess.run(["nix", "path-info", "--json", path], capture_output=True,
                             text=True, check=True, env=env).stdout
        assert isinstance(json.loads(out), list)
    '''
)


def test_a_test_assuming_one_path_info_shape_fails_on_the_other(
    other_root: Path, other_venv: Path, nix_conf: Path, tmp_path: Path
) -> None:
    """The two runs really differ: a test written against one shape passes under
    exactly one of the two Nix versions (under 2.8, and not under 2.26)."""
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "test_shape.py").write_text(SHAPE_TEST)
    here = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(probe)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    there: Any = container.run_once(
        other_root,
        [f"{container.VENV}/bin/python", "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "/probe"],
        binds=[(other_venv, container.VENV)],
        binds_ro=[(probe, "/probe"), (nix_conf, "/etc/nix/nix.conf")],
        env={"PYTHONDONTWRITEBYTECODE": "1", "HOME": "/root"},
        timeout=120,
    )  # fmt: skip
    outcomes = {here.returncode == 0, there.returncode == 0}
    assert outcomes == {True, False}, (here.stdout[-2000:], there.stdout[-2000:])
