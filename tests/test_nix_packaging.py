"""The Nix side of nixfleet: flake.nix, flake.lock, modules/ and their docs.

Everything runs with real Nix (Debian's nix-bin is enough) and offline:
- every .nix file parses;
- nixosModules evaluate without fetching nixpkgs;
- outputs that need nixpkgs are evaluated against tests/nix/stub-nixpkgs, a
  recording stand-in, to check what the flake asks nixpkgs for;
- option declarations are read by evaluating each module with a recording lib
  (tests/nix/option-declarations.nix) and must all be described and documented
  in docs/nixos-modules.md.
The real module system (a nixpkgs lib CI cannot download, given by an environment
variable) is checked by tests/nix/test_real_lib.py (docs/nixos-modules.md).
Flake files are copied to a temporary directory and used as a path: flake, so
uncommitted changes are seen and the work tree is never written to.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

# Runs under both Nix versions (tests/system/test_nix_versions.py).
pytestmark = pytest.mark.nix

ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = ["aarch64-linux", "x86_64-linux"]
MODULES = {
    "services.nixfleet-agent": ROOT / "modules" / "agent.nix",
    "services.nixfleet-control-plane": ROOT / "modules" / "control-plane.nix",
}
DOCS = ROOT / "docs" / "nixos-modules.md"
SEED_USAGE = """services.nixfleet-agent = {
  enable = true;
  controlPlaneUrl = "https://fleet.example.com";
  tags = ["prod" "web" "region-eu"];
};"""
SKIP_DIRS = {".git", ".venv", "venv", "node_modules", "__pycache__", ".mypy_cache", ".ruff_cache"}


def _nix_env() -> dict[str, str]:
    # No daemon, no substituters: evaluation must work on a bare CI machine.
    return {
        **os.environ,
        "NIX_CONFIG": "substituters =\nexperimental-features = nix-command flakes",
    }


@pytest.fixture(scope="module")
def nix() -> str:
    path = shutil.which("nix")
    if path is None or shutil.which("nix-instantiate") is None:
        pytest.fail("nix is not installed: run `apt-get install -y nix-bin` (Debian) and retry")
    return path


def run(*argv: str, cwd: Path | None = None) -> str:
    done = subprocess.run(
        argv, capture_output=True, text=True, env=_nix_env(), cwd=cwd, timeout=60, check=False
    )
    if done.returncode != 0:
        pytest.fail(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr}")
    return done.stdout


def nix_json(*argv: str, cwd: Path | None = None) -> Any:
    return json.loads(run(*argv, cwd=cwd))


@pytest.fixture(scope="module")
def flake(nix: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of what the flake evaluates, as a plain directory."""
    dest = tmp_path_factory.mktemp("flake")
    for name in ("flake.nix", "flake.lock", "pyproject.toml"):
        shutil.copy2(ROOT / name, dest / name)
    for name in ("modules", "tests/nix", "tests/nixos"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


@pytest.fixture(scope="module")
def stubbed(flake: Path) -> list[str]:
    """Arguments of `nix eval` evaluating the flake against the stub nixpkgs."""
    stub = flake / "tests" / "nix" / "stub-nixpkgs"
    return ["--no-write-lock-file", "--override-input", "nixpkgs", f"path:{stub}"]


def eval_flake(flake: Path, attr: str, apply: str, extra: list[str] | None = None) -> Any:
    return nix_json(
        "nix", "eval", "--json", *(extra or []), f"path:{flake}#{attr}", "--apply", apply
    )


def nix_files() -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith("result")]
        files += [Path(dirpath) / f for f in filenames if f.endswith(".nix")]
    return sorted(files)


def declared_options(module: Path) -> list[dict[str, Any]]:
    options: list[dict[str, Any]] = nix_json(
        "nix-instantiate",
        "--eval",
        "--strict",
        "--json",
        str(ROOT / "tests" / "nix" / "option-declarations.nix"),
        "--arg",
        "module",
        str(module),
    )
    return options


def documented_options() -> set[str]:
    return set(re.findall(r"^### `(services\.[^`]+)`$", DOCS.read_text(), re.MULTILINE))


# --- syntax ------------------------------------------------------------------------------


def test_every_nix_file_parses(nix: str) -> None:
    files = nix_files()
    assert ROOT / "flake.nix" in files
    for path in files:
        run("nix-instantiate", "--parse", str(path))


def test_flake_lock_pins_nixpkgs() -> None:
    lock = json.loads((ROOT / "flake.lock").read_text())
    assert lock["version"] == 7
    assert lock["root"] == "root"
    assert lock["nodes"]["root"]["inputs"] == {"nixpkgs": "nixpkgs"}
    node = lock["nodes"]["nixpkgs"]
    assert node["original"] == {
        "owner": "NixOS",
        "ref": "nixos-unstable",
        "repo": "nixpkgs",
        "type": "github",
    }
    assert node["locked"] == {
        "lastModified": 1768564909,
        "narHash": "sha256-Kell/SpJYVkHWMvnhqJz/8DqQg2b6PguxVWOuadbHCc=",
        "owner": "NixOS",
        "repo": "nixpkgs",
        "rev": "e4bae1bd10c9c57b2cf517953ab70060a828ee6f",
        "type": "github",
    }


# --- flake outputs -----------------------------------------------------------------------


def test_nixos_modules_evaluate_without_nixpkgs(flake: Path) -> None:
    # No --override-input: the pinned nixpkgs is not available offline, so this
    # passes only if nixosModules never touches it.
    names = eval_flake(flake, "nixosModules", "builtins.attrNames")
    assert names == ["agent", "control-plane", "default"]
    imports = eval_flake(flake, "nixosModules.default.imports", "map (m: builtins.isFunction m)")
    assert imports == [True, True]


def test_package(flake: Path, stubbed: list[str]) -> None:
    assert eval_flake(flake, "packages", "builtins.attrNames", stubbed) == SYSTEMS
    for system in SYSTEMS:
        call = eval_flake(
            flake,
            f"packages.{system}.default.stub",
            """s: {
              inherit (s) kind;
              inherit (s.args) pname version pyproject makeWrapperArgs disabledTestPaths;
              build = map (d: d.name) s.args.build-system;
              deps = map (d: d.name) s.args.dependencies;
              checks = map (d: d.name) s.args.nativeCheckInputs;
              main = s.args.meta.mainProgram;
              native = map (d: d.name) s.args.nativeBuildInputs;
              inherit (s.args) postFixup;
            }""",
            stubbed,
        )
        assert call["kind"] == "buildPythonApplication"
        assert call["pname"] == "nixfleet"
        pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
        assert call["version"] == pyproject["project"]["version"]
        assert call["pyproject"] is True
        assert call["build"] == ["setuptools"]
        # The flake's runtime dependencies are exactly pyproject.toml's, with the
        # `postgresql` extra (psycopg's "binary" wheel is pip's; Nix links libpq).
        project = pyproject["project"]
        wanted = [
            re.split(r"[<>=~!\[ ]", d)[0].lower()
            for d in [*project["dependencies"], *project["optional-dependencies"]["postgresql"]]
        ]
        assert sorted(call["deps"]) == sorted(wanted)
        assert "pytestCheckHook" in call["checks"]
        assert call["main"] == "nixfleet"
        # The package installs the completion files `nixfleet completion` prints.
        assert call["native"] == ["installShellFiles"]
        for shell in ("bash", "zsh", "fish"):
            assert f"--{shell} <($out/bin/nixfleet completion {shell})" in call["postFixup"]
        wrap = call["makeWrapperArgs"]
        assert wrap[:3] == ["--suffix", "PATH", ":"]
        assert {p.split("-", 1)[1] for p in wrap[3].split(":")} == {"nix/bin", "systemd/bin"}


def test_apps(flake: Path, stubbed: list[str]) -> None:
    apps = eval_flake(
        flake,
        "apps",
        "builtins.mapAttrs (_: builtins.mapAttrs (_: a: { inherit (a) type program; }))",
        stubbed,
    )
    assert sorted(apps) == SYSTEMS
    for system in SYSTEMS:
        programs = {name: app["program"].rsplit("/", 1)[1] for name, app in apps[system].items()}
        assert programs == {
            "default": "nixfleet",
            "nixfleet": "nixfleet",
            "nixfleet-agent": "nixfleet-agent",
            "nixfleet-control-plane": "nixfleet-control-plane",
        }
        assert {app["type"] for app in apps[system].values()} == {"app"}


def test_checks_include_package_and_vm_tests(flake: Path, stubbed: list[str]) -> None:
    checks = eval_flake(
        flake,
        "checks",
        """builtins.mapAttrs (_: builtins.mapAttrs (name: c:
             if name == "package" then c.stub.kind
             else { inherit (c.stub) kind; nodes = builtins.attrNames c.stub.args.nodes; }))""",
        stubbed,
    )
    assert sorted(checks) == SYSTEMS
    for system in SYSTEMS:
        assert checks[system].pop("package") == "buildPythonApplication"
        assert sorted(checks[system]) == [
            "vm-canary-rollout",
            "vm-control-plane-down",
            "vm-failed-generation",
        ]
        for test in checks[system].values():
            assert test == {"kind": "runNixOSTest", "nodes": ["agent1", "agent2", "cp"]}


def test_dev_shell_formatter_and_overlay(flake: Path, stubbed: list[str]) -> None:
    shell = eval_flake(
        flake, "devShells.x86_64-linux.default.stub.args.packages", "map (p: p.name)", stubbed
    )
    assert {"python3-env", "ruff", "nix", "nixfmt-rfc-style"} <= set(shell)
    formatter = eval_flake(flake, "formatter", "builtins.mapAttrs (_: f: f.name)", stubbed)
    assert formatter == dict.fromkeys(SYSTEMS, "nixfmt-rfc-style")
    # The overlay builds the same package against whatever nixpkgs it is applied to.
    name = nix_json(
        "nix-instantiate",
        "--eval",
        "--json",
        "--expr",
        """let
          stub = (import ./tests/nix/stub-nixpkgs/flake.nix).outputs { self = stub; };
          flake = (import ./flake.nix).outputs { self = flake; nixpkgs = stub; };
          pkgs = stub.legacyPackages.x86_64-linux;
        in (flake.overlays.default pkgs pkgs).nixfleet.name""",
        cwd=flake,
    )
    assert name == "nixfleet-0.1.0"


# --- options and their reference ---------------------------------------------------------


@pytest.fixture(scope="module")
def options(nix: str) -> dict[str, list[dict[str, Any]]]:
    return {prefix: declared_options(path) for prefix, path in MODULES.items()}


def test_modules_declare_the_contracted_options(options: dict[str, list[dict[str, Any]]]) -> None:
    agent = {
        o["name"].removeprefix("services.nixfleet-agent.")
        for o in options["services.nixfleet-agent"]
    }
    assert {
        "enable", "package", "controlPlaneUrl", "machineId", "tags", "pollInterval",
        "backoff.initial", "backoff.max", "cacheUrl", "trustedPublicKeys", "tokenFile",
        "enrollTokenFile", "healthChecks.systemd", "healthChecks.http",
        "healthChecks.command", "dryRun", "allowInsecure", "settings",
    } <= agent  # fmt: skip
    cp = {
        o["name"].removeprefix("services.nixfleet-control-plane.")
        for o in options["services.nixfleet-control-plane"]
    }
    assert {
        "enable", "package", "listen.address", "listen.port", "openFirewall", "settings",
        "adminKeyFile", "rolloutsDir", "historyDays", "historyMaxEvents", "nginx.enable",
        "nginx.virtualHost",
        "nginx.enableACME", "nginx.forceSSL", "database.url", "database.passwordFile",
        "database.createLocally",
    } <= cp  # fmt: skip


def test_every_option_has_a_description(options: dict[str, list[dict[str, Any]]]) -> None:
    missing = [
        o["name"]
        for opts in options.values()
        for o in opts
        if not isinstance(o["description"], str) or not o["description"].strip()
    ]
    assert not missing, f"options without a description: {missing}"


def test_every_option_is_documented(options: dict[str, list[dict[str, Any]]]) -> None:
    declared = {o["name"] for opts in options.values() for o in opts}
    documented = documented_options()
    assert not declared - documented, (
        f"options missing from {DOCS.relative_to(ROOT)} (add a `### \\`name\\`` section): "
        f"{sorted(declared - documented)}"
    )
    assert not documented - declared, (
        f"{DOCS.relative_to(ROOT)} documents options that do not exist: "
        f"{sorted(documented - declared)}"
    )


def test_docs_sections_are_complete() -> None:
    sections = re.split(r"^### ", DOCS.read_text(), flags=re.MULTILINE)[1:]
    assert sections
    for section in sections:
        title, _, body = section.partition("\n")
        text = body.split("- Type:")[0].strip()
        assert text, f"{title}: no description"
        assert "- Type:" in body, f"{title}: no type"
        assert "- Default:" in body, f"{title}: no default"


def test_docs_show_the_seed_usage() -> None:
    assert SEED_USAGE in re.sub(r"^ {10}", "", DOCS.read_text(), flags=re.MULTILINE)
