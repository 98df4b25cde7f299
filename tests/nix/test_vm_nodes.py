"""The NixOS VM tests' configuration (tests/nixos/common.nix) under the real lib.

The VM tests themselves (the flake's `checks`) need full nixpkgs and KVM, which
these machines do not have (docs/nixos-modules.md says so). What the module system
decides about them is checked here with the pinned nixpkgs lib: each node of
common.nix, with the flake's own `nixosModules`, evaluates without failed
assertions; the control plane reads its admin key from the /etc file the node
writes (a path outside the store, as the secret options demand) and the prelude's
ADMIN_KEY is that key; the agents point at the control plane's address and port
and report their node name; the specialisations the tests switch to (v2, broken)
evaluate by extendModules and change what the tests expect; the nodes' units
render and pass `systemd-analyze verify`; the test scripts compile as the driver
runs them (prelude first).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import load_file

from nixfleet import schemas

units = load_file("nixfleet_test_units", Path(__file__).resolve().parent / "units.py")

pytestmark = pytest.mark.nix

NODES = units.ROOT / "tests" / "nix" / "vm-nodes.nix"
NIXOS = units.ROOT / "tests" / "nixos"


@pytest.fixture(scope="module")
def lib() -> str:
    path: str = units.require_lib()
    return path


@pytest.fixture(scope="module")
def vm(lib: str) -> Any:
    return units.nix_eval(
        f"let r = import {NODES} {{ lib = import {lib}; }}; "
        "in { inherit (r) prelude nodeNames nodes; }"
    )


def prelude_value(prelude: str, name: str) -> str:
    line = next(ln for ln in prelude.splitlines() if ln.startswith(f"{name} = "))
    value: str = json.loads(line.split(" = ", 1)[1])
    return value


def test_every_node_evaluates_without_failed_assertions(vm: Any) -> None:
    assert vm["nodeNames"] == ["agent1", "agent2", "cp"]
    for name, node in vm["nodes"].items():
        assert (node["failedAssertions"], node["warnings"]) == ([], []), name


def test_the_admin_key_comes_from_an_etc_file_outside_the_store(vm: Any) -> None:
    cp = vm["nodes"]["cp"]
    unit = cp["services"]["nixfleet-control-plane"]
    assert unit["LoadCredential"] == ["admin-key:/etc/nixfleet-admin-key"]
    key = cp["etc"]["nixfleet-admin-key"]
    # Copied (not a link into the store), readable by root only: PID 1 reads it
    # for LoadCredential, the dynamic user never does.
    assert key["mode"] == "0400"
    assert key["text"] == prelude_value(vm["prelude"], "ADMIN_KEY")
    assert "%d/admin-key" in unit["ExecStart"]


def test_agents_reach_the_control_plane_as_their_node_name(vm: Any) -> None:
    cp = vm["nodes"]["cp"]
    address, port = cp["controlPlane"]["config"]["listen"].rsplit(":", 1)
    assert address == "0.0.0.0" and cp["firewall"] == [int(port)]
    for name in ("agent1", "agent2"):
        config = vm["nodes"][name]["agent"]["config"]
        schemas.validate("agent-config", config, what=f"{name}'s agent config")
        assert config["machine_id"] == name
        assert config["control_plane_url"] == f"http://cp:{port}"
        assert config["tags"] == ["test", "web"]
        assert config["health_checks"]["systemd"] == ["fleet-app.service"]
    assert {"nixfleet", "curl", "jq"} <= set(cp["systemPackages"])


def test_the_specialisations_change_what_the_tests_expect(vm: Any) -> None:
    agent = vm["nodes"]["agent1"]
    assert agent["etc"]["fleet-version"]["text"] == "v1"
    assert agent["services"]["fleet-app"]["ExecStart"].endswith("/bin/true")
    specs = agent["specialisations"]
    assert sorted(specs) == ["broken", "v2"]
    assert specs["v2"]["etc"]["fleet-version"]["text"] == "v2"
    assert specs["v2"]["services"]["fleet-app"]["ExecStart"].endswith("/bin/true")
    assert specs["broken"]["etc"]["fleet-version"]["text"] == "broken"
    assert specs["broken"]["services"]["fleet-app"]["ExecStart"].endswith("/bin/false")
    # The agent itself is the same in every specialisation.
    for spec in specs.values():
        assert spec["services"]["nixfleet-agent"] == agent["services"]["nixfleet-agent"]


@pytest.mark.parametrize("node", ["cp", "agent1"])
def test_the_nodes_units_render_and_verify(lib: str, node: str, tmp_path: Path) -> None:
    if units.systemd_analyze() is None:
        pytest.skip("systemd-analyze is missing here (Debian: apt-get install systemd)")
    packages = units.real_packages()  # the flake's package default, too: see vm-nodes.nix
    out = units.render(
        lib,
        f"(import {NODES} {{ lib = import {lib}; packages = {units.nix_attrs(packages)}; }})"
        f".nodeModules.{node}",
        packages=packages,
        script_dir=str(tmp_path / "s"),
    )
    written = units.write(out, tmp_path / "units", tmp_path / "s")
    expected = {"cp": {"nixfleet-control-plane.service"},
                "agent1": {"nixfleet-agent.service", "fleet-app.service"}}[node]  # fmt: skip
    assert set(written.units) == expected
    for path in written.units.values():
        code, output = units.verify([path])
        assert (code, output) == (0, ""), f"{path.name}:\n{output}"


def test_the_test_scripts_compile_after_the_prelude(vm: Any) -> None:
    scripts = sorted(p for p in NIXOS.glob("*.py") if p.name != "prelude.py")
    assert scripts, "no VM test scripts"
    for script in scripts:
        compile(vm["prelude"] + script.read_text(), str(script), "exec")
