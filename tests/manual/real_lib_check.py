"""Evaluate the NixOS modules with the REAL nixpkgs module system (lib.evalModules).

Not part of the CI suite (its file name keeps pytest's default collection away):
CI has no nixpkgs. Run it by hand before a release, with a nixpkgs lib at hand:

    NIXPKGS_LIB=/path/to/nixpkgs/lib python -m pytest tests/manual/real_lib_check.py

It fails (never skips) when NIXPKGS_LIB is unset.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from test_nix_packaging import ROOT, SEED_USAGE, nix, nix_json, options  # noqa: F401


@pytest.fixture(scope="module")
def real_lib() -> str:
    lib = os.environ.get("NIXPKGS_LIB")
    if not lib:
        pytest.fail("set NIXPKGS_LIB to a nixpkgs lib/ directory (see this file's docstring)")
    return lib


def eval_real(lib: str, config: str) -> Any:
    return nix_json(
        "nix-instantiate",
        "--read-write-mode",
        "--eval",
        "--strict",
        "--json",
        "--expr",
        f"""let r = import {ROOT}/tests/nix/eval-modules.nix {{
              lib = import {lib}; config = {config}; }};
            in {{ inherit (r) options failedAssertions warnings agent controlPlane; }}""",
    )


def test_real_lib_agrees_with_declarations(
    real_lib: str,
    options: dict[str, list[dict[str, Any]]],  # noqa: F811
) -> None:
    real = eval_real(real_lib, "{ }")
    assert sorted(o["name"] for o in real["options"]) == sorted(
        o["name"] for opts in options.values() for o in opts
    )


def test_real_lib_renders_the_seed_config(real_lib: str) -> None:
    out = eval_real(
        real_lib,
        "{ " + SEED_USAGE + " services.nixfleet-control-plane.enable = true; }",
    )
    assert out["failedAssertions"] == []
    agent = out["agent"]["config"]
    assert agent["tags"] == ["prod", "web", "region-eu"]
    assert agent["use_systemd_run"] is True
    unit = out["agent"]["unit"]
    assert unit["restartIfChanged"] is False
    assert unit["serviceConfig"]["Restart"] == "always"
    from nixfleet import schemas

    schemas.validate("agent-config", agent, what="rendered agent config")
    cp = out["controlPlane"]
    assert cp["config"]["db"] == "/var/lib/nixfleet/nixfleet.db"
    assert cp["unit"]["serviceConfig"]["DynamicUser"] is True


def test_real_lib_renders_control_plane_settings_the_server_accepts(
    real_lib: str, tmp_path: Path
) -> None:
    import json

    from nixfleet import settings as config

    out = eval_real(
        real_lib,
        "{ services.nixfleet-control-plane = { enable = true; "
        "settings = { workers = 2; stale_after = 600; }; }; }",
    )
    assert out["failedAssertions"] == []
    rendered = out["controlPlane"]["config"]
    assert rendered["workers"] == 2 and rendered["threads"] == 8
    f = tmp_path / "settings.json"
    f.write_text(json.dumps(rendered))
    settings = config.load(f)
    assert (settings.workers, settings.stale_after) == (2, 600)


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ('controlPlaneUrl = "http://fleet.example.com";', "must be an\nhttps:// URL"),
        ('controlPlaneUrl = "https://f"; machineId = "-x";', "is not a valid machine id"),
        ('controlPlaneUrl = "https://f"; backoff.initial = 900;', "must not\nexceed"),
    ],
)
def test_real_lib_assertions(real_lib: str, config: str, needle: str) -> None:
    out = eval_real(real_lib, "{ services.nixfleet-agent = { enable = true; " + config + " }; }")
    assert any(needle in message for message in out["failedAssertions"]), out["failedAssertions"]
