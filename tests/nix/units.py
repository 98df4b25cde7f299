"""The modules' own systemd units: find the real nixpkgs lib, render, write, verify.

Shared by the normal suite (tests/nix/test_real_lib.py) and the container tier
(tests/system/). Loaded by path like fakes.py. The nixpkgs lib is never copied
into the project: it comes from NIXFLEET_NIXPKGS_LIB (.ci/run points it at
../shared/nixpkgs-lib/lib), else from the flake's locked nixpkgs input when Nix
can fetch it; when neither works the tests skip with the reason, unless
NIXFLEET_REQUIRE_NIXPKGS_LIB=1 (set by .ci/run), which makes that a failure.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
RENDER = HERE / "render-units.nix"
LIB_VAR = "NIXFLEET_NIXPKGS_LIB"
REQUIRE_VAR = "NIXFLEET_REQUIRE_NIXPKGS_LIB"
NIX_CONFIG = "substituters =\nexperimental-features = nix-command flakes"


def _flake_input_lib() -> tuple[str | None, str]:
    """The lib of the flake's locked nixpkgs input, if Nix can fetch it (internet)."""
    expr = (
        f'(builtins.getFlake "path:{ROOT}").inputs.nixpkgs.outPath'
        if (ROOT / "flake.lock").exists()
        else "null"
    )
    try:
        done = subprocess.run(
            ["nix", "eval", "--raw", "--impure", "--expr", expr],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={**os.environ, "NIX_CONFIG": "experimental-features = nix-command flakes"},
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, str(e)
    if done.returncode != 0:
        errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
        return None, errors[0] if errors else "nix eval failed"
    return done.stdout.strip() + "/lib", ""


@functools.cache
def _find_lib() -> tuple[str | None, str]:
    given = os.environ.get(LIB_VAR)
    if given:
        path = Path(given).resolve()
        if not (path / "modules.nix").is_file():
            return None, f"{LIB_VAR}={given} is not a nixpkgs lib/ directory (no modules.nix)"
        return str(path), ""
    lib, why = _flake_input_lib()
    if lib is None:
        return None, (
            f"no nixpkgs lib: {LIB_VAR} is unset and the flake's nixpkgs input cannot be "
            f"fetched ({why}); set {LIB_VAR}=/path/to/nixpkgs/lib (a nixpkgs checkout's "
            "lib/), or run the tests once with network access so Nix fetches that input"
        )
    return lib, ""


def nixpkgs_lib() -> str:
    """Path of the real nixpkgs lib; skips (or fails under CI) with the reason."""
    lib, why = _find_lib()
    if lib is None:
        if os.environ.get(REQUIRE_VAR) == "1":
            pytest.fail(f"{why} ({REQUIRE_VAR}=1: the real-lib tests must run here)")
        pytest.skip(why)
    return lib


def require_lib() -> str:
    """The real lib for tests that evaluate with it: nix-instantiate must be there too."""
    if shutil.which("nix-instantiate") is None:
        pytest.fail("nix is not installed: run `apt-get install -y nix-bin` (Debian) and retry")
    return nixpkgs_lib()


def nix_eval(expr: str, *, check: bool = True) -> Any:
    """`nix-instantiate --eval --strict --json` of `expr`: its value (or, unchecked,
    the finished process)."""
    done = subprocess.run(
        ["nix-instantiate", "--read-write-mode", "--eval", "--strict", "--json", "--expr", expr],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "NIX_CONFIG": NIX_CONFIG},
    )
    if not check:
        return done
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def real_packages() -> dict[str, str]:
    """Directories the units' ExecStart and PATH may point at on this machine."""
    agent = Path(sys.executable).parent / "nixfleet-agent"
    if not agent.exists():
        pytest.fail(f"{agent} is missing: run ./dev setup (the venv provides the package)")
    usr = {n: "/usr" for n in ("nix", "systemd", "coreutils", "findutils", "gnugrep", "gnused")}
    return {"nixfleet": str(Path(sys.executable).parent.parent), **usr}


def nix_string(value: str) -> str:
    return json.dumps(value).replace("${", "\\${")


def nix_attrs(values: dict[str, str]) -> str:
    return "{ " + " ".join(f"{json.dumps(k)} = {nix_string(v)};" for k, v in values.items()) + " }"


def render(
    lib: str,
    config: str,
    *,
    packages: dict[str, str] | None = None,
    script_dir: str = "/run/nixfleet-unit-scripts",
    global_environment: dict[str, str] | None = None,
    instantiate: list[str] | None = None,
    render_file: str = str(RENDER),
) -> dict[str, Any]:
    """Evaluate the modules with `config` (a Nix expression) and render their units.

    `instantiate` is the nix-instantiate command line prefix (e.g. one that runs
    inside a container); the paths it is given must be valid where it runs.
    """
    expr = (
        f"import {render_file} {{ lib = import {lib}; config = {config}; "
        f"packages = {nix_attrs(packages or {})}; scriptDir = {nix_string(script_dir)}; "
        f"globalEnvironment = {nix_attrs(global_environment or {})}; }}"
    )
    argv = [*(instantiate or ["nix-instantiate"]), "--read-write-mode", "--eval", "--strict"]
    done = subprocess.run(
        [*argv, "--json", "--expr", expr],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "NIX_CONFIG": NIX_CONFIG},
    )
    if done.returncode != 0:
        pytest.fail(f"rendering the modules' units failed:\n{done.stderr}")
    out: dict[str, Any] = json.loads(done.stdout)
    assert out["failedAssertions"] == [], out["failedAssertions"]
    return out


@dataclass(frozen=True)
class Written:
    units: dict[str, Path]
    scripts: list[Path]


def write(rendered: dict[str, Any], unit_dir: Path, script_dir: Path) -> Written:
    """Write the unit files and their (executable) job scripts."""
    unit_dir.mkdir(parents=True, exist_ok=True)
    units: dict[str, Path] = {}
    scripts: list[Path] = []
    for name, unit in rendered["units"].items():
        path = unit_dir / name
        path.write_text(unit["text"])
        units[name] = path
        for script, text in unit["scripts"].items():
            script_dir.mkdir(parents=True, exist_ok=True)
            target = script_dir / script
            target.write_text(text)
            target.chmod(0o755)
            scripts.append(target)
    return Written(units, scripts)


# Stand-ins for what nixpkgs' postgresql module defines: the control plane with
# database.createLocally requires them, and systemd-analyze verify loads a unit's
# dependencies (from the unit file's own directory too).
POSTGRESQL_UNITS = {
    "postgresql.service": "[Unit]\nDescription=PostgreSQL Server\n\n"
    "[Service]\nType=notify\nExecStart=/bin/true\n",
    "postgresql-setup.service": "[Unit]\nRequires=postgresql.service\nAfter=postgresql.service\n\n"
    "[Service]\nType=oneshot\nRemainAfterExit=true\nExecStart=/bin/true\n",
    "postgresql.target": "[Unit]\nRequires=postgresql.service postgresql-setup.service\n",
}


def systemd_analyze() -> str | None:
    return shutil.which("systemd-analyze")


def verify(units: list[Path], *, argv_prefix: list[str] | None = None) -> tuple[int, str]:
    """`systemd-analyze verify`: it exits 0 on warnings, so stderr is what counts."""
    done = subprocess.run(
        [*(argv_prefix or []), "systemd-analyze", "verify", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
    )
    return done.returncode, done.stderr + done.stdout
