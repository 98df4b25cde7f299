"""`nixfleet release create` with real Nix on a test flake, against a real control plane."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
import uuid
from pathlib import Path

import pytest
from conftest import ControlPlane, run_cli

# Runs under both Nix versions (tests/system/test_nix_versions.py).
pytestmark = pytest.mark.nix

FLAKE = Path(__file__).resolve().parent / "nix" / "release-flake"


def require_nix() -> None:
    """Fail (never skip) with the fix when nix is missing."""
    missing = [c for c in ("nix", "nix-store", "git") if shutil.which(c) is None]
    if missing:
        raise AssertionError(
            f"{', '.join(missing)} not found: release tests need real Nix; install it with "
            "`apt-get install -y nix-bin git` (Debian) and run as root"
        )


def git(cwd: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
    )


@pytest.fixture
def flake(tmp_path: Path) -> Path:
    """The test flake in a clean git checkout, salted so its store paths are new."""
    require_nix()
    target = tmp_path / "fleet"
    shutil.copytree(FLAKE, target)
    (target / "salt").write_text(uuid.uuid4().hex)
    git(target, "init", "-q")
    git(target, "add", ".")
    git(target, "commit", "-q", "-m", "fleet")
    return target


def valid(path: str) -> bool:
    return (
        subprocess.run(
            ["nix-store", "--check-validity", path], check=False, capture_output=True
        ).returncode
        == 0
    )


def cli(cp: ControlPlane, *args: str) -> object:
    return run_cli(
        *args, env={"NIXFLEET_CONTROL_PLANE_URL": cp.url, "NIXFLEET_API_KEY": cp.admin_key}
    )


def test_create_builds_writes_and_registers(
    control_plane: ControlPlane, flake: Path, tmp_path: Path
) -> None:
    cp = control_plane
    dry = cli(
        cp,
        "release",
        "create",
        "--flake",
        str(flake),
        "--eval-only",
        "--no-register",
        "--out",
        str(tmp_path / "eval"),
    )
    assert dry.returncode == 0, dry.stderr  # type: ignore[attr-defined]
    rel_id = dry.stdout.strip()  # type: ignore[attr-defined]
    evaluated = tomllib.loads((tmp_path / "eval" / f"{rel_id}.toml").read_text())
    eval_paths = {e["hostname"]: e["store_path"] for e in evaluated["entries"]}
    assert set(eval_paths) == {"web-01", "web-02", "db-01", "lab-01"}
    assert not any(valid(p) for p in eval_paths.values())  # evaluated, not built

    cache = tmp_path / "cache"
    r = cli(cp, "release", "create", "--flake", str(flake), "--push-to", f"file://{cache}")
    assert r.returncode == 0, r.stderr  # type: ignore[attr-defined]
    assert r.stdout.strip() == rel_id  # type: ignore[attr-defined]  # same entries, same id
    toml_path = flake / "releases" / f"{rel_id}.toml"
    doc = tomllib.loads(toml_path.read_text())
    assert {e["hostname"]: e["store_path"] for e in doc["entries"]} == eval_paths
    assert all(valid(p) for p in eval_paths.values())
    assert all(Path(p, "bin", "switch-to-configuration").exists() for p in eval_paths.values())
    tags = {e["hostname"]: e["tags"] for e in doc["entries"]}
    assert tags == {
        "db-01": ["db", "prod"],
        "lab-01": [],
        "web-01": ["prod", "web"],
        "web-02": ["prod", "web"],
    }
    assert {e["platform"] for e in doc["entries"]} == {"x86_64-linux"}
    assert doc["cache_url"] == f"file://{cache}"
    assert len(doc["flake_rev"]) == 40
    assert len(list(cache.glob("*.narinfo"))) >= 4  # pushed
    registered = cp.client().get(f"/api/v1/releases/{rel_id}")
    assert [e["store_path"] for e in registered["entries"]] == [
        eval_paths[h] for h in sorted(eval_paths)
    ]
    again = cli(cp, "release", "create", "--flake", str(flake))
    assert again.returncode == 0 and "already registered" in again.stderr  # type: ignore[attr-defined]
    listing = cli(cp, "release", "list")
    assert rel_id in listing.stdout  # type: ignore[attr-defined]


def test_host_and_tag_selection(control_plane: ControlPlane, flake: Path) -> None:
    r = cli(
        control_plane,
        "release",
        "create",
        "--flake",
        str(flake),
        "--eval-only",
        "--hosts",
        "web-*,db-01",
        "--tags",
        "prod",
        "--dry-run",
    )
    assert r.returncode == 0, r.stderr  # type: ignore[attr-defined]
    doc = tomllib.loads(r.stdout)  # type: ignore[attr-defined]
    assert [e["hostname"] for e in doc["entries"]] == ["db-01", "web-01", "web-02"]
    assert not (flake / "releases").exists()  # a dry run writes nothing
    web = cli(
        control_plane, "release", "create", "--flake", str(flake), "--dry-run", "--tags", "web"
    )
    assert [e["hostname"] for e in tomllib.loads(web.stdout)["entries"]] == ["web-01", "web-02"]  # type: ignore[attr-defined]
    none = cli(control_plane, "release", "create", "--flake", str(flake), "--hosts", "mail-*")
    assert none.returncode == 2 and "matches no host" in none.stderr  # type: ignore[attr-defined]
    assert control_plane.client().get("/api/v1/releases")["releases"] == []


def test_dirty_tree_is_refused_unless_allowed(control_plane: ControlPlane, flake: Path) -> None:
    (flake / "salt").write_text(uuid.uuid4().hex)  # an uncommitted change
    r = cli(control_plane, "release", "create", "--flake", str(flake), "--eval-only")
    assert r.returncode == 2  # type: ignore[attr-defined]
    assert "uncommitted changes" in r.stderr and "--allow-dirty" in r.stderr  # type: ignore[attr-defined]
    assert not (flake / "releases").exists()
    ok = cli(
        control_plane, "release", "create", "--flake", str(flake), "--eval-only", "--allow-dirty"
    )
    assert ok.returncode == 0, ok.stderr  # type: ignore[attr-defined]
    assert (flake / "releases" / f"{ok.stdout.strip()}.toml").exists()  # type: ignore[attr-defined]


def test_push_url_secrets_never_reach_the_release() -> None:
    from nixfleet.flake import public_url

    assert public_url("file:///srv/cache?secret-key=/run/keys/sk") == "file:///srv/cache"
    assert (
        public_url("s3://bucket?region=eu-1&secret-key=/k&compression=zstd")
        == "s3://bucket?region=eu-1&compression=zstd"
    )
    assert public_url("https://cache.example.com") == "https://cache.example.com"
