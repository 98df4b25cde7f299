"""What differs between the Nix versions nixfleet supports (Debian 12's 2.8, 13's 2.26).

These tests run under both: on this machine, and in the system tier's container
with the other Debian's nix-bin (tests/system/test_nix_versions.py), like every
test marked `nix`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from nixfleet import nix

pytestmark = pytest.mark.nix

ROOT = Path(__file__).resolve().parents[2]
NIX_CONFIG = "substituters =\nexperimental-features = nix-command flakes"


def run(*argv: str, cwd: Path | None = None) -> str:
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=cwd,
        env={**os.environ, "NIX_CONFIG": NIX_CONFIG},
    )
    assert done.returncode == 0, f"{' '.join(argv)}:\n{done.stderr}"
    return done.stdout


def nix_version() -> tuple[int, int]:
    found = re.search(r"(\d+)\.(\d+)", run("nix", "--version"))
    assert found, "cannot read nix --version"
    return int(found.group(1)), int(found.group(2))


def test_path_info_json_has_the_shape_of_this_nix(tmp_path: Path) -> None:
    """Nix <= 2.18 prints a list of objects, later Nix an object keyed by path:
    `nix.parse_path_info` reads both, and this machine's Nix prints the one its
    version says (so a test that assumes one shape fails on the other Nix)."""
    f = tmp_path / "hello.txt"
    f.write_text("hello\n")
    path = run("nix-store", "--add", str(f)).strip()
    raw = json.loads(run("nix", "path-info", "--json", path))
    expected = dict if nix_version() >= (2, 19) else list
    assert isinstance(raw, expected), f"Nix {nix_version()} printed {type(raw).__name__}"
    (info,) = nix.parse_path_info(raw)
    assert info.path == path and info.valid


def test_flake_check_no_build_with_the_stub_nixpkgs(tmp_path: Path) -> None:
    """`nix flake check --no-build` evaluates every output (packages, apps, checks with
    their VM tests, modules, overlay, dev shell) against the recording stub nixpkgs."""
    flake = tmp_path / "flake"
    flake.mkdir()
    for name in ("flake.nix", "flake.lock", "pyproject.toml"):
        shutil.copy2(ROOT / name, flake / name)
    for name in ("modules", "tests/nix", "tests/nixos"):
        shutil.copytree(ROOT / name, flake / name, ignore=shutil.ignore_patterns("__pycache__"))
    stub = flake / "tests" / "nix" / "stub-nixpkgs"
    run(
        "nix", "flake", "check", "--no-build", "--no-write-lock-file",
        "--override-input", "nixpkgs", f"path:{stub}", f"path:{flake}",
    )  # fmt: skip
