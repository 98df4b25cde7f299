"""Rollouts end to end: the real control-plane process, the real CLI, simulated agents.

Agents are HTTP clients that behave like nixfleet-agent: report, read the desired
generation from the answer, "switch" to it (or fail and keep reporting the failure),
report again. Nothing is mocked; waits poll the API until a state is reached.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import yaml
from conftest import ControlPlane, new_control_plane, run_cli, wait_until

from nixfleet.client import Client
from nixfleet.database_url import DatabaseURL, parse
from nixfleet.errors import NixfleetError
from nixfleet.models import utcnow
from nixfleet.store import credentials, open_store

HOSTS = [f"web-{i:02}" for i in range(10)]


def gen(host: str, salt: str) -> str:
    return f"/nix/store/{salt * 32}-nixos-system-{host}"


class Agent:
    """One simulated nixfleet-agent: level-triggered, like the real one."""

    def __init__(self, cp: ControlPlane, host: str, token: str) -> None:
        self.host = host
        self.client = Client(cp.url, token)
        self.current = gen(host, "o")
        self.failed: str | None = None
        self.breaks = False  # activation of a new generation fails (and rolls back)

    def poll(self) -> None:
        body: dict[str, Any] = {"current_generation": self.current, "success": True}
        if self.failed:
            body.update(
                success=False,
                attempted_generation=self.failed,
                message="rolled back: fake.service failed to start",
            )
        desired = self.client.report(self.host, body)["desired_generation"]
        if desired and desired not in (self.current, self.failed):
            if self.breaks:
                self.failed = desired
            else:
                self.current, self.failed = desired, None


class Fleet:
    """Ten agents polling in a background thread while the test drives the CLI."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self.agents = {h: Agent(cp, h, cp.register(h, ["web", "prod"])) for h in HOSTS}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll_all(self) -> None:
        for a in self.agents.values():
            # While the control plane restarts, the agent retries on its next poll.
            with contextlib.suppress(NixfleetError):
                a.poll()

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.is_set():
                self.poll_all()
                self._stop.wait(0.05)

        self._stop.clear()
        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


@pytest.fixture(params=["sqlite", "postgresql"])
def cp(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ControlPlane]:
    """A control plane reconciling every 0.1 s, with a readonly key next to the admin key,
    on each backend."""
    url = (
        request.getfixturevalue("migrated_postgres_url") if request.param == "postgresql" else None
    )
    rollouts_dir = tmp_path / "rollouts"
    rollouts_dir.mkdir()
    plane = new_control_plane(
        tmp_path / "cp",
        "--reconcile-interval",
        "0.1",
        "--rollouts-dir",
        str(rollouts_dir),
        database_url=url,
    )
    s = open_store(parse(url) if url else DatabaseURL("sqlite", plane.db))
    with s.transaction() as conn:
        readonly = credentials.create_key(conn, "viewer", "readonly", "test", utcnow())
    s.close()
    plane.readonly_key = readonly  # type: ignore[attr-defined]
    plane.rollouts_dir = rollouts_dir  # type: ignore[attr-defined]
    plane.start()
    yield plane
    plane.stop()


@pytest.fixture
def fleet(cp: ControlPlane) -> Iterator[Fleet]:
    f = Fleet(cp)
    f.poll_all()  # everyone reports once: machines become active
    yield f
    f.stop()


def write_release(tmp_path: Path, salt: str = "n") -> Path:
    doc = {
        "flake_ref": "git+file:///srv/fleet",
        "flake_rev": "0" * 40,
        "cache_url": "https://cache.example.com",
        "entries": [
            {"hostname": h, "store_path": gen(h, salt), "platform": "x86_64-linux", "tags": ["web"]}
            for h in HOSTS
        ],
    }
    from nixfleet.flake import release_from_document, write_toml

    return write_toml(release_from_document(doc), tmp_path / "releases")


def write_rollout(tmp_path: Path, release: Path | str, name: str = "web", **kw: Any) -> Path:
    doc: dict[str, Any] = {
        "version": 1,
        "name": name,
        "release": str(release),
        "target": {"tags": ["web", "prod"]},
        "strategy": "staged",
        "batches": [1, "25%", "100%"],
        "failure_threshold": 0,
        "health_timeout": "5m",
    }
    doc.update(kw)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def cli(cp: ControlPlane, *args: str) -> Any:
    return run_cli(
        *args, env={"NIXFLEET_CONTROL_PLANE_URL": cp.url, "NIXFLEET_API_KEY": cp.admin_key}
    )


def test_staged_rollout_completes(cp: ControlPlane, fleet: Fleet, tmp_path: Path) -> None:
    release = write_release(tmp_path)
    rollout_file = write_rollout(tmp_path, release)
    plan = cli(cp, "rollout", "plan", "-f", str(rollout_file), "--json")
    assert plan.returncode == 3, plan.stderr  # plan registers nothing: the release is unknown
    r = cli(cp, "rollout", "apply", "-f", str(rollout_file))
    assert r.returncode == 0, r.stderr
    assert "registered release" in r.stderr and "created rollout web" in r.stderr
    rollout_id = r.stdout.strip()
    again = cli(cp, "rollout", "apply", "-f", str(rollout_file))
    assert again.returncode == 0 and "unchanged" in again.stderr
    assert again.stdout.strip() == rollout_id
    fleet.start()
    r = cli(cp, "rollout", "status", "web", "--wait", "--interval", "0.1")
    assert r.returncode == 0, r.stderr + r.stdout
    data = cp.client().get(f"/api/v1/rollouts/{rollout_id}")
    assert data["status"] == "completed"
    assert [len(b["machines"]) for b in data["batches"]] == [1, 3, 6]
    status = cp.client().get("/api/v1/status")
    assert status["summary"]["in_sync"] == 10
    assert {m["desired_generation"] for m in status["machines"]} == {gen(h, "n") for h in HOSTS}
    listing = cli(cp, "rollout", "list")
    assert "completed" in listing.stdout and "10/10 healthy" in listing.stdout


def test_failure_pauses_and_resume_completes(
    cp: ControlPlane, fleet: Fleet, tmp_path: Path
) -> None:
    fleet.agents["web-02"].breaks = True  # web-02 is in batch 2 (web-01..web-03)
    r = cli(cp, "rollout", "apply", "-f", str(write_rollout(tmp_path, write_release(tmp_path))))
    assert r.returncode == 0, r.stderr
    fleet.start()
    r = cli(cp, "rollout", "status", "web", "--wait", "--interval", "0.1")
    assert r.returncode == 8, r.stderr
    assert "nixfleet rollout resume web" in r.stderr
    assert "agent reported failure" in r.stdout
    data = cp.client().get("/api/v1/rollouts/web")
    assert data["status"] == "paused"
    assert [b["status"] for b in data["batches"]] == ["succeeded", "failed", "pending"]
    status = {m["id"]: m for m in cp.client().get("/api/v1/status")["machines"]}
    assert status["web-02"]["sync"] == "failed"
    assert status["web-05"]["desired_generation"] == gen("web-05", "o") or (
        status["web-05"]["desired_generation"] is None
    )
    # The operator fixes the machine (and lets its agent retry), then resumes.
    agent = fleet.agents["web-02"]
    agent.breaks, agent.failed = False, None
    assert cli(cp, "rollout", "resume", "web").returncode == 0
    r = cli(cp, "rollout", "status", "web", "--wait", "--interval", "0.1")
    assert r.returncode == 0, r.stderr + r.stdout
    assert cp.client().get("/api/v1/status")["summary"]["in_sync"] == 10


def test_revert_restores_previous_desired(cp: ControlPlane, fleet: Fleet, tmp_path: Path) -> None:
    for h in HOSTS:
        cp.set_desired(h, gen(h, "o"), f"https://old.example.com/{h}")
    fleet.agents["web-03"].breaks = True
    release = write_release(tmp_path)
    r = cli(
        cp, "rollout", "apply", "-f", str(write_rollout(tmp_path, release, on_failure="revert"))
    )
    assert r.returncode == 0, r.stderr
    fleet.start()
    r = cli(cp, "rollout", "status", "web", "--wait", "--interval", "0.1")
    assert r.returncode == 8 and "failed" in r.stderr
    for h in HOSTS:
        m = cp.machine(h)
        assert m["desired_generation"] == gen(h, "o"), h
        assert m["desired_cache_url"] == f"https://old.example.com/{h}"


def test_kill_9_mid_rollout_continues_after_restart(
    cp: ControlPlane, fleet: Fleet, tmp_path: Path
) -> None:
    release = write_release(tmp_path)
    rollout_file = write_rollout(tmp_path, release, batches=[1, 1, 1, 1, "100%"])
    assert cli(cp, "rollout", "apply", "-f", str(rollout_file)).returncode == 0
    fleet.start()

    def batches_done() -> int:
        data = cp.client().get("/api/v1/rollouts/web")
        return sum(b["status"] == "succeeded" for b in data["batches"])

    wait_until("two batches", lambda: batches_done() >= 2)
    cp.stop(kill=True)
    cp.start()
    r = cli(cp, "rollout", "status", "web", "--wait", "--interval", "0.1")
    assert r.returncode == 0, r.stderr + r.stdout
    data = cp.client().get("/api/v1/rollouts/web")
    assert [b["status"] for b in data["batches"]] == ["succeeded"] * 5
    kinds = [e["kind"] for e in data["events"]]
    assert kinds.count("batch-started") == 5  # no batch started twice


def test_overlap_is_refused_naming_machines(cp: ControlPlane, fleet: Fleet, tmp_path: Path) -> None:
    release = write_release(tmp_path)
    assert cli(cp, "rollout", "apply", "-f", str(write_rollout(tmp_path, release))).returncode == 0
    other = write_rollout(tmp_path, release, name="other", target={"hosts": ["web-04", "web-07"]})
    r = cli(cp, "rollout", "apply", "-f", str(other))
    assert r.returncode == 4
    assert "web-04 (web), web-07 (web)" in r.stderr
    changed = write_rollout(tmp_path, release, soak="10s")
    r = cli(cp, "rollout", "apply", "-f", str(changed))
    assert r.returncode == 4 and "different document" in r.stderr
    assert cli(cp, "rollout", "cancel", "web").returncode == 0
    assert cli(cp, "rollout", "apply", "-f", str(other)).returncode == 0
    r = cli(cp, "release", "delete", release.stem)
    assert r.returncode == 4 and "referenced by rollout" in r.stderr


def test_deploy_from_flags_and_permissions(cp: ControlPlane, fleet: Fleet, tmp_path: Path) -> None:
    release = write_release(tmp_path)
    args = [
        "deploy",
        "--release",
        str(release),
        "--hosts",
        "web-00,web-01",
        "--strategy",
        "all-at-once",
        "--health-timeout",
        "2m",
    ]
    viewer = {"NIXFLEET_CONTROL_PLANE_URL": cp.url, "NIXFLEET_API_KEY": cp.readonly_key}  # type: ignore[attr-defined]
    assert run_cli(*args, env=viewer).returncode == 6
    bad = cli(
        cp,
        "deploy",
        "--release",
        "rel-000000000000",
        "--hosts",
        "web-00",
        "--batch-size",
        "0,abc",
        "--soak",
        "5d",
    )
    assert bad.returncode == 7
    assert "--batch-size" in bad.stderr and "--soak" in bad.stderr
    fleet.start()
    r = cli(cp, *args, "--wait", "--interval", "0.1")
    assert r.returncode == 0, r.stderr + r.stdout
    again = cli(cp, *args)
    assert again.returncode == 0 and "unchanged" in again.stderr
    rollout_id = r.stdout.splitlines()[0]
    plan_body = cp.client().get(f"/api/v1/rollouts/{rollout_id}")["document"]
    plan = Client(cp.url, cp.readonly_key).post("/api/v1/rollouts/plan", plan_body)  # type: ignore[attr-defined]
    assert plan["batches"] == [{"index": 0, "size": 2, "hosts": ["web-00", "web-01"]}]
    diff = cli(cp, "release", "diff", release.stem, release.stem, "--json")
    assert diff.returncode == 0 and '"changed": []' in diff.stdout


def test_invalid_files_are_refused_with_lines(cp: ControlPlane, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "version: 1\nname: web\nrelease: rel-000000000000\ntarget:\n  tagz: [web]\n"
        "strategy: staged\nbatches: [0, '25%']\non_failure: explode\nsoak: 5d\n"
    )
    r = cli(cp, "rollout", "validate", str(bad))
    assert r.returncode == 7
    for expected in (
        "target.tagz (line 5)",
        "batches[0] (line 7)",
        "on_failure (line 8)",
        "soak (line 9)",
    ):
        assert expected in r.stderr, r.stderr
    assert cli(cp, "rollout", "apply", "-f", str(bad)).returncode == 7
    assert cp.client().get("/api/v1/rollouts")["rollouts"] == []
    release = write_release(tmp_path)
    text = release.read_text().replace("x86_64-linux", "x86 64", 1)
    broken = tmp_path / "broken.toml"
    broken.write_text(text.replace('store_path = "/nix/store/', 'store_path = "/tmp/', 1))
    r = cli(cp, "release", "register", str(broken))
    assert r.returncode == 7
    lines = text.splitlines()
    store_line = next(i for i, x in enumerate(lines, 1) if x.startswith("store_path"))
    assert f"entries[0].store_path (line {store_line})" in r.stderr, r.stderr
    assert "entries[0].platform (line" in r.stderr
    with_bad_release = write_rollout(tmp_path, broken, name="x")
    r = cli(cp, "rollout", "apply", "-f", str(with_bad_release))
    assert r.returncode == 7 and "release (line 3)" in r.stderr
    assert cp.client().get("/api/v1/releases")["releases"] == []


def test_gitops_directory(cp: ControlPlane, fleet: Fleet, tmp_path: Path) -> None:
    directory: Path = cp.rollouts_dir  # type: ignore[attr-defined]
    release = write_release(directory)
    write_rollout(
        directory,
        Path("releases") / release.name,
        name="from-git",
        target={"hosts": ["web-00", "web-01"]},
    )
    (directory / "broken.yaml").write_text("version: 1\nname: broken\nstrategy: sideways\n")

    def listing() -> dict[str, Any]:
        return {r["name"]: r for r in cp.client().get("/api/v1/rollouts")["rollouts"]}

    wait_until("gitops apply", lambda: {"from-git", "broken"} <= set(listing()))
    broken = listing()["broken"]
    assert broken["status"] == "invalid"
    fields = {(e["field"], e.get("line")) for e in broken["errors"]}
    assert ("strategy", 3) in fields and ("release", 1) in fields
    r = cli(cp, "rollout", "list", "--status", "invalid")
    assert "broken" in r.stdout and "strategy (line 3)" in r.stdout
    fleet.start()
    wait_until("completed", lambda: listing()["from-git"]["status"] == "completed")
    # A restart re-applies every file: nothing new is created.
    cp.stop()
    cp.start()
    write_rollout(
        directory, Path("releases") / release.name, name="second", target={"hosts": ["web-05"]}
    )
    wait_until("new file applied", lambda: "second" in listing())
    names = [r["name"] for r in cp.client().get("/api/v1/rollouts")["rollouts"]]
    assert names.count("from-git") == 1
    (directory / "broken.yaml").write_text(
        tomli_w.dumps({})
        + "version: 1\nname: broken\nrelease: releases/"
        + release.name
        + "\ntarget: {hosts: [web-09]}\nstrategy: all-at-once\n"
    )
    wait_until(
        "fixed file applied",
        lambda: (
            listing()["broken"]["status"] == "running"
            or listing()["broken"]["status"] == "completed"
        ),
    )
