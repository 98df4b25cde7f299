"""Fixtures for the agent tests: a fake machine (profile, current-system link, state dir)
on the real Nix store, signed binary caches on 127.0.0.1, and agent configs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import load_file

from nixfleet.agent.config import AgentConfig, load_config

fakes = load_file("nixfleet_test_fakes", Path(__file__).resolve().parents[1] / "nix" / "fakes.py")
Machine = fakes.Machine


@pytest.fixture(name="fakes")
def fakes_module() -> ModuleType:
    """The tests/nix/fakes.py helpers (real nix: builds, caches, store edits)."""
    return fakes


@pytest.fixture(autouse=True)
def _real_nix(monkeypatch: pytest.MonkeyPatch) -> None:
    fakes.require_nix()
    monkeypatch.setenv("NIX_CONFIG", fakes.NIX_CONFIG)


@pytest.fixture
def machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    root = tmp_path / "machine"
    (root / "profiles").mkdir(parents=True)
    m = Machine(
        root=root,
        profile=root / "profiles" / "system",
        current_system=root / "current-system",
        state_dir=root / "state",
        switch_log=root / "switch.log",
    )
    monkeypatch.setenv("NIXFLEET_SWITCH_LOG", str(m.switch_log))
    return m


@pytest.fixture
def base_system(machine: Any) -> str:
    """The machine runs a first generation already."""
    path: str = fakes.build_system("base")
    machine.install(path)
    return path


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[Any]:
    c = fakes.BinaryCache(tmp_path / "cache-root")
    yield c
    c.close()


@pytest.fixture
def make_config(machine: Any) -> Callable[..., AgentConfig]:
    def make(**overrides: Any) -> AgentConfig:
        base: dict[str, Any] = {
            "control_plane_url": "http://127.0.0.1:9",
            "machine_id": "web-01",
            "profile": str(machine.profile),
            "current_system": str(machine.current_system),
            "state_dir": str(machine.state_dir),
        }
        base.update(overrides)
        return load_config(None, base)

    return make


@pytest.fixture
def published(cache: Any) -> Callable[..., str]:
    """Build a system, push it (signed) to the cache, delete it from the local store."""

    def publish(name: str, *, sign: bool = True, key_file: Path | None = None, **build: Any) -> str:
        path: str = fakes.build_system(name, **build)
        cache.push(path, sign=sign, key_file=key_file)
        fakes.delete_from_store(path)
        return path

    return publish
