"""Every test marked `nix` again, under the container's Nix (the other Debian's).

The machine itself may be Debian 12 (nix-bin 2.8) or 13 (2.26): the tier detects
which and boots containers of the other release (container.container_suite), so
both versions run on every CI machine. NIXFLEET_ROOTFS_SUITE forces the release,
which is how the Debian-13-host path (a Debian 12 container) runs on a Debian 12
machine too (then both runs are Nix 2.8). The working tree is mounted read-only
with a throw-away overlay on top; the container has its own, empty Nix store.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nixfleet_test_container as container  # loaded by conftest
import nixfleet_test_units as units  # loaded by conftest
import pytest
from conftest import NIX_VERSIONS

pytestmark = pytest.mark.system


def nix_version(text: str) -> tuple[int, int]:
    found = re.search(r"(\d+)\.(\d+)", text)
    assert found, f"cannot read a Nix version from {text!r}"
    return int(found.group(1)), int(found.group(2))


def host_nix() -> str:
    done = subprocess.run(["nix", "--version"], capture_output=True, text=True, check=False)
    return done.stdout.strip() or "nix: not found"


def lists_path_info(version: tuple[int, int]) -> bool:
    """Nix <= 2.18 prints `nix path-info --json` as a list, later Nix as an object."""
    return version < (2, 19)


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
        private_network=True,  # its own 127.0.0.1: no port shared with this machine's tests
    )
    return done


def summary(output: str) -> str:
    lines = [ln for ln in output.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
    return lines[-1].strip("= ") if lines else "no summary"


@pytest.mark.long
def test_nix_marked_tests_pass_under_the_other_nix(
    system_root: Path,
    system_venv: Path,
    nix_conf: Path,
    record_property: Callable[[str, object], None],
) -> None:
    lib = units.nixpkgs_lib()
    version = inner(system_root, system_venv, nix_conf, None, "nix", "--version").stdout.strip()
    assert version, "no nix in the container"
    done = inner(
        system_root, system_venv, nix_conf, lib,
        f"{container.VENV}/bin/python", "-m", "pytest", "-q", "-p", "no:cacheprovider",
        "-m", "nix and not system", "--ignore=tests/ui", "tests",  # ui: browser deps
    )  # fmt: skip
    here = container.host_release() or "not Debian"
    # Printed at the end of the run by conftest (a property travels with the test's
    # report from a pytest-xdist worker to the run's own process).
    results = [f"{host_nix()} (this machine, {here}): the nix-marked tests above"]
    if os.environ.get(container.SUITE_VAR):
        results.append(f"(the container's release forced by {container.SUITE_VAR})")
    results.append(f"{version} ({system_root.name}): {summary(done.stdout)}")
    record_property(NIX_VERSIONS, results)
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
    system_root: Path, system_venv: Path, nix_conf: Path, tmp_path: Path
) -> None:
    """The two runs really differ: a test written against one shape passes under
    exactly one of the two Nix versions (under 2.8, and not under 2.26). With the
    container's release forced to this machine's, each side still gets the outcome
    its version says."""
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "test_shape.py").write_text(SHAPE_TEST)
    here = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(probe)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    there: Any = container.run_once(
        system_root,
        [f"{container.VENV}/bin/python", "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "/probe"],
        binds=[(system_venv, container.VENV)],
        binds_ro=[(probe, "/probe"), (nix_conf, "/etc/nix/nix.conf")],
        env={"PYTHONDONTWRITEBYTECODE": "1", "HOME": "/root"},
        timeout=120, private_network=True,
    )  # fmt: skip
    inner_nix = inner(system_root, system_venv, nix_conf, None, "nix", "--version").stdout
    versions = (nix_version(host_nix()), nix_version(inner_nix))
    outcomes = (here.returncode == 0, there.returncode == 0)
    # On Debian 12: 2.8 here, 2.26 there, (True, False): it passes under exactly one.
    assert outcomes == tuple(lists_path_info(v) for v in versions), (
        versions, here.stdout[-2000:], there.stdout[-2000:],
    )  # fmt: skip
