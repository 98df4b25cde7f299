"""Fetch, switch, health and rollback against the real Nix store and real profiles,
driven through the library (no control plane)."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

import nixfleet_test_fakes as fakes  # loaded by conftest from tests/nix/fakes.py
import pytest

from nixfleet.agent.activate import Activator, observe_current
from nixfleet.agent.loop import decide
from nixfleet.agent.state import AgentState, InProgress, StateStore, now
from nixfleet.models import parse_time

# Runs under both Nix versions (tests/system/test_nix_versions.py).
pytestmark = pytest.mark.nix


def marker_checks(machine: Any) -> dict[str, Any]:
    argv = ["test", "-e", f"{machine.current_system}/healthy"]
    return {"command": [{"name": "marker", "argv": argv, "timeout": 10}]}


def activator(make_config: Any, **overrides: Any) -> Activator:
    config = make_config(**overrides)
    return Activator(config, StateStore(config.state_dir))


def test_deploy_fetches_signed_closure_switches_and_records(
    machine: Any, base_system: str, cache: Any, published: Any, make_config: Any
) -> None:
    new = published("new")
    assert not fakes.is_valid(new)
    act = activator(
        make_config, trusted_public_keys=[cache.public_key], health_checks=marker_checks(machine)
    )

    result = act.deploy(new, cache.url)

    assert result.success, result.message
    assert result.message == f"deployed {new}"
    assert fakes.is_valid(new)
    assert machine.profile_target == new
    assert machine.current == new == observe_current(act.config)
    assert machine.switches() == [f"switch {new}"]
    assert result.health is not None and result.health.all_passed
    state = StateStore(machine.state_dir).load()
    assert state.in_progress is None
    assert state.last_outcome is not None and state.last_outcome.success
    assert state.last_outcome.previous == base_system
    assert state.failures == {}


def test_failing_switch_rolls_back_profile_and_link(
    machine: Any, base_system: str, cache: Any, published: Any, make_config: Any
) -> None:
    bad = published("bad-switch", fail=True)
    act = activator(make_config, trusted_public_keys=[cache.public_key])

    result = act.deploy(bad, cache.url)

    assert not result.success
    assert result.message.startswith("rolled back: switch to ")
    assert "fake.service" in result.message
    assert machine.current == base_system
    assert machine.profile_target == base_system
    # The failed switch moved the link (as NixOS does), the rollback switch moved it back.
    assert machine.switches() == [f"switch {bad}", f"switch {base_system}"]
    state = StateStore(machine.state_dir).load()
    assert bad in state.failures and state.in_progress is None
    # Profile: 1 = base, 2 = bad; rollback via `nix-env --rollback` made 1 current again.
    assert machine.generations() == ["system-1-link", "system-2-link"]


def test_failing_health_check_rolls_back(
    machine: Any, base_system: str, cache: Any, published: Any, make_config: Any
) -> None:
    sick = published("sick", healthy=False)
    act = activator(
        make_config, trusted_public_keys=[cache.public_key], health_checks=marker_checks(machine)
    )

    result = act.deploy(sick, cache.url)

    assert not result.success
    assert result.message.startswith("rolled back: health checks failed: marker: exit 1")
    assert result.health is not None and not result.health.all_passed
    assert machine.current == base_system == machine.profile_target
    assert machine.switches() == [f"switch {sick}", f"switch {base_system}"]


@pytest.mark.parametrize("how", ["unsigned", "wrong-key", "tampered"])
def test_untrusted_closures_are_refused_and_nothing_changes(
    how: str, machine: Any, base_system: str, cache: Any, make_config: Any, tmp_path: Any
) -> None:
    path = fakes.build_system(f"untrusted-{how}")
    if how == "unsigned":
        cache.push(path, sign=False)
    elif how == "wrong-key":
        sk, _ = fakes.other_key(tmp_path)
        cache.push(path, key_file=sk)
    else:
        cache.push(path)
        cache.tamper(path)
    fakes.delete_from_store(path)
    generations = machine.generations()
    act = activator(make_config, trusted_public_keys=[cache.public_key])

    result = act.deploy(path, cache.url)

    assert not result.success and not result.changed
    assert result.message.startswith(f"fetch of {path} failed, nothing activated")
    expected = "hash mismatch" if how == "tampered" else fakes.UNTRUSTED
    assert re.search(expected, result.message)
    assert not fakes.is_valid(path)
    assert machine.current == base_system == machine.profile_target
    assert machine.generations() == generations
    assert machine.switches() == []
    # Nothing happened on the machine, so it is not recorded as a failed generation.
    assert StateStore(machine.state_dir).load().failures == {}


def test_without_cache_url_realises_through_substituters(
    machine: Any, base_system: str, make_config: Any
) -> None:
    local = fakes.build_system("local")  # already valid: nothing to substitute
    result = activator(make_config).deploy(local, None)
    assert result.success and machine.current == local
    missing = "/nix/store/" + "0" * 32 + "-nixos-system-missing"
    result = activator(make_config).deploy(missing, None)
    assert not result.success and not result.changed
    assert "nothing activated" in result.message


def test_a_path_that_is_not_a_system_is_refused(
    machine: Any, base_system: str, make_config: Any
) -> None:
    not_system = fakes.run(
        "nix", "eval", "--raw", "--impure", "--expr", 'toString (builtins.toFile "x" "y")'
    ).stdout.strip()
    result = activator(make_config).deploy(not_system, None)
    assert not result.success and "no bin/switch-to-configuration" in result.message
    assert machine.current == base_system


def test_first_activation_without_previous_generation(machine: Any, make_config: Any) -> None:
    bad = fakes.build_system("first-bad", fail=True)
    result = activator(make_config).deploy(bad, None)
    assert not result.success
    assert result.message.startswith("no previous generation to roll back to")


def test_dry_run_changes_nothing(
    machine: Any, base_system: str, cache: Any, published: Any, make_config: Any
) -> None:
    new = published("dry")
    result = activator(make_config, dry_run=True).deploy(new, cache.url)
    assert result.success and not result.changed
    assert result.message.startswith(f"dry-run: would fetch {new} from {cache.url}")
    assert not fakes.is_valid(new)
    assert machine.current == base_system and machine.switches() == []
    assert not machine.state_dir.exists()


def _interrupted(machine: Any, base: str, target: str) -> None:
    """What an agent killed mid-switch leaves: profile set, in-progress record."""
    fakes.run("nix-env", "-p", machine.profile, "--set", target)
    store = StateStore(machine.state_dir)
    store.save(AgentState(in_progress=InProgress(target, base, base, now())))


def test_recover_after_restart_when_switch_completed(
    machine: Any, base_system: str, make_config: Any
) -> None:
    target = fakes.build_system("recover-done")
    _interrupted(machine, base_system, target)
    machine.current_system.unlink()
    machine.current_system.symlink_to(target)  # the switch got that far

    result = activator(make_config, health_checks=marker_checks(machine)).recover()

    assert result is not None and result.success
    assert machine.current == target
    state = StateStore(machine.state_dir).load()
    assert state.in_progress is None and state.last_outcome is not None
    assert state.last_outcome.success


def test_recover_after_restart_when_switch_did_not_complete(
    machine: Any, base_system: str, make_config: Any
) -> None:
    target = fakes.build_system("recover-interrupted")
    _interrupted(machine, base_system, target)

    result = activator(make_config).recover()

    assert result is not None and not result.success
    assert "interrupted" in result.message and result.message.startswith("rolled back: ")
    assert machine.current == base_system == machine.profile_target
    assert target in StateStore(machine.state_dir).load().failures
    assert activator(make_config).recover() is None  # concluded: nothing left to do


def test_decide_is_level_triggered() -> None:
    a, b = "/nix/store/" + "a" * 32 + "-a", "/nix/store/" + "b" * 32 + "-b"
    failed = AgentState().with_failure(b, "rolled back: x", "2026-01-01T00:00:00Z")
    at = parse_time("2026-01-01T00:00:00Z")
    assert at is not None
    assert not decide(None, a, AgentState(), None)
    assert not decide(a, a, AgentState(), None)
    assert decide(b, a, AgentState(), None)
    assert decide(b, None, AgentState(), None)
    assert not decide(b, a, failed, None)
    # A retry request is one the agent has not tried under yet, compared as the CP's
    # own value: neither clock matters (the CP's may be behind the agent's).
    tried = failed.with_attempt(b, "2025-12-31T00:00:00Z")
    assert not decide(b, a, tried, "2025-12-31T00:00:00Z")
    assert decide(b, a, tried, "2025-12-30T00:00:00Z")
    assert decide(b, a, failed, "2025-01-01T00:00:00Z")
    assert decide(a, b, failed, None)  # another generation is not blocked


def test_state_file_roundtrip_and_corruption(machine: Any) -> None:
    store = StateStore(machine.state_dir)
    state = AgentState(last_desired="/nix/store/" + "c" * 32 + "-c").with_failure("/x", "m")
    store.save(state)
    assert store.load() == state
    store.path.write_text("{not json")
    assert store.load() == AgentState()
    many = AgentState()
    for i in range(40):
        many = many.with_failure(f"/p{i}", "m", f"2026-01-01T00:00:{i:02d}Z")
    assert len(many.failures) == 32 and "/p39" in many.failures and "/p0" not in many.failures
    assert replace(many, failures={}).failures == {}


def test_switch_runs_in_a_transient_unit_with_systemd_run(machine: Any, make_config: Any) -> None:
    act = activator(make_config, use_systemd_run=True)
    system = "/nix/store/" + "s" * 32 + "-nixos-system-x"
    argv = act._switch_argv(system, "nixfleet-switch-1")
    assert argv[:2] == ["systemd-run", "--unit=nixfleet-switch-1"]
    assert {"--wait", "--collect", "--pipe"} <= set(argv)
    assert f"--setenv=NIXFLEET_CURRENT_SYSTEM={machine.current_system}" in argv
    assert argv[-2:] == [f"{system}/bin/switch-to-configuration", "switch"]
    assert act._new_unit() is not None
    assert activator(make_config)._new_unit() is None
    assert activator(make_config)._switch_argv(system, None) == [
        f"{system}/bin/switch-to-configuration",
        "switch",
    ]
