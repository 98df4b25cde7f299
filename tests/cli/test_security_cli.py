"""Security against the real control-plane process with the real CLI: the walk-through of
docs/security.md, and no secret in argv, logs or any output but its one creation."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import CliResult, ControlPlane, run_cli
from ports import free_port

from nixfleet.client import Client
from nixfleet.errors import AuthenticationError, PermissionDeniedError

STORE_PATH = "/nix/store/" + "c" * 32 + "-nixos-system-web-01"


def host_cli(db: Path, *args: str) -> CliResult:
    """`nixfleet-control-plane --db DB …` as run on the control-plane host."""
    proc = subprocess.run(
        [sys.executable, "-m", "nixfleet.controlplane.main", "--db", str(db), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def secret_file(path: Path, secret: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return path


@dataclass
class Recorder:
    """Every CLI run of a scenario, to search its argv and output streams afterwards."""

    url: str
    runs: list[tuple[tuple[str, ...], CliResult]] = field(default_factory=list)

    def cli(self, *args: str, env: dict[str, str] | None = None, ok: bool = True) -> CliResult:
        full = {"NIXFLEET_CONTROL_PLANE_URL": self.url, **(env or {})}
        result = run_cli(*args, env=full)
        self.runs.append((args, result))
        if ok:
            assert result.returncode == 0, f"{args}: {result.stderr}"
        return result


@pytest.fixture
def fresh_cp(tmp_path: Path) -> ControlPlane:
    """A control plane over an empty database, logging at debug level (not yet started)."""
    db = tmp_path / "cp" / "nixfleet.db"
    db.parent.mkdir()
    return ControlPlane(
        db=db,
        port=free_port(),
        admin_key="",
        log=tmp_path / "cp" / "cp.log",
        extra_args=["--log-level", "debug"],
    )


def test_walkthrough_of_docs_security_md(fresh_cp: ControlPlane, tmp_path: Path) -> None:
    cp = fresh_cp
    # 1. Bootstrap: the first admin key, on the host, against the database.
    created = host_cli(cp.db, "keys", "create", "--role", "admin", "--name", "ops")
    assert created.returncode == 0, created.stderr
    admin = created.stdout.strip()
    assert admin.startswith("nfk_") and created.stdout.count("\n") == 1
    cp.admin_key = admin
    cp.start()
    try:
        rec = Recorder(cp.url)
        admin_env = {"NIXFLEET_API_KEY_FILE": str(secret_file(tmp_path / "ops.key", admin))}
        listed = host_cli(cp.db, "keys", "list")
        assert listed.stdout.startswith("ops\tadmin") and admin not in listed.stdout

        # 2. A deploy key for CI, and a readonly key for a dashboard.
        ci_file, viewer_file = tmp_path / "ci.key", tmp_path / "viewer.key"
        deploy = rec.cli(
            "keys", "create", "--name", "ci", "--role", "deploy", "--output", str(ci_file),
            env=admin_env,
        )  # fmt: skip
        assert deploy.stdout == "" and ci_file.stat().st_mode & 0o777 == 0o600
        deploy_key = ci_file.read_text().strip()
        rec.cli(
            "keys", "create", "--name", "viewer", "--role", "readonly",
            "--output", str(viewer_file), env=admin_env,
        )  # fmt: skip
        viewer_key = viewer_file.read_text().strip()
        keys = rec.cli("keys", "list", env=admin_env).stdout
        assert "ci" in keys and "deploy" in keys and "viewer" in keys and deploy_key not in keys

        # 3. Enroll an agent with an enrollment token.
        token_file = tmp_path / "enroll.token"
        rec.cli(
            "enroll-tokens", "create", "--uses", "1", "--expires", "1h", "--tags", "prod",
            "--hostname-glob", "web-*", "--output", str(token_file), env=admin_env,
        )  # fmt: skip
        enroll_token = token_file.read_text().strip()
        assert enroll_token.startswith("nfe_")
        # What the agent does with the token file it was given (docs/security.md):
        agent = Client(cp.url, enroll_token)
        answer = agent.post("/api/v1/enroll", {"machine_id": "web-01"})
        agent.close()
        machine_token = answer["token"]
        Client(cp.url, machine_token).report("web-01", {"current_generation": STORE_PATH})
        # The token is used up now.
        with pytest.raises(AuthenticationError, match="used-up"):
            Client(cp.url, enroll_token).post("/api/v1/enroll", {"machine_id": "web-02"})
        tokens = rec.cli("enroll-tokens", "list", env=admin_env).stdout
        assert "used-up" in tokens and "0/1" in tokens
        machines = rec.cli("machines", "list", "--tags", "prod", env=admin_env).stdout
        assert "web-01" in machines and "active" in machines

        # 4. The readonly key is refused a rollout (403 -> exit 6); the deploy key may.
        release = Client(cp.url, deploy_key).post(
            "/api/v1/releases",
            {
                "flake_ref": "github:example/fleet",
                "entries": [
                    {"hostname": "web-01", "store_path": STORE_PATH, "platform": "x86_64-linux"}
                ],
            },
        )["id"]
        rollout = tmp_path / "web.yaml"
        rollout.write_text(
            f"version: 1\nname: web-first\nrelease: {release}\n"
            "target:\n  tags: [prod]\nstrategy: all-at-once\n"
        )
        viewer_env = {"NIXFLEET_API_KEY": viewer_key}
        refused = rec.cli("rollout", "apply", "-f", str(rollout), env=viewer_env, ok=False)
        assert refused.returncode == 6, refused.stderr
        assert "readonly" in refused.stderr and "deploy" in refused.stderr
        assert "web-first" not in rec.cli("rollout", "list", env=viewer_env).stdout
        rec.cli("rollout", "apply", "-f", str(rollout), env={"NIXFLEET_API_KEY": deploy_key})
        assert "web-first" in rec.cli("rollout", "list", env=viewer_env).stdout

        # The audit log tells the story, with actors.
        log = rec.cli("audit", "--csv", env=viewer_env).stdout.splitlines()
        assert log[0] == "id,at,actor,action,target,detail"
        actions = [(row.split(",")[2], row.split(",")[3]) for row in log[1:]]
        assert any(a == "key:ci" and b.startswith("rollout.") for a, b in actions)
        assert ("host:cli", "key.create") in actions
        assert any(a.startswith("enroll:et-") and b == "machine.enroll" for a, b in actions)
        assert ("key:ops", "enroll-token.create") in actions
    finally:
        cp.stop()


def test_no_secret_in_argv_logs_or_other_output(fresh_cp: ControlPlane, tmp_path: Path) -> None:
    cp = fresh_cp
    admin = host_cli(cp.db, "keys", "create", "--role", "admin", "--name", "ops").stdout.strip()
    boot_key = "nfk_" + "b" * 40  # the module's adminKeyFile path
    cp.extra_args += ["--admin-key-file", str(secret_file(tmp_path / "boot.key", boot_key))]
    cp.admin_key = admin
    cp.start()
    created: dict[str, int] = {}  # secret -> index of the run that printed it
    try:
        rec = Recorder(cp.url)
        env = {"NIXFLEET_API_KEY_FILE": str(secret_file(tmp_path / "ops.key", admin))}
        boot_env = {"NIXFLEET_API_KEY": boot_key}

        def creating(*args: str, use: dict[str, str] = env) -> str:
            result = rec.cli(*args, env=use)
            secret = result.stdout.strip()
            created[secret] = len(rec.runs) - 1
            return secret

        deploy = creating("keys", "create", "--name", "ci", "--role", "deploy", use=boot_env)
        token = creating("machines", "register", "web-01", "--issue-token")
        rotated = creating("machines", "rotate-token", "web-01")
        enroll = creating("enroll-tokens", "create", "--uses", "2")
        machine = Client(cp.url, enroll).post("/api/v1/enroll", {"machine_id": "web-02"})["token"]
        for machine_id, secret in (("web-01", rotated), ("web-02", machine)):
            Client(cp.url, secret).report(machine_id, {"current_generation": STORE_PATH})
        # Refused requests are logged (route and actor): still no secret.
        with pytest.raises(AuthenticationError):
            Client(cp.url, token).report("web-01", {"current_generation": STORE_PATH})
        with pytest.raises(PermissionDeniedError):
            Client(cp.url, machine).report("web-01", {"current_generation": STORE_PATH})
        rec.cli("machines", "list", env={"NIXFLEET_API_KEY": deploy})
        rec.cli("keys", "list", "--json", env=env)
        rec.cli("enroll-tokens", "list", "--json", env=env)
        rec.cli("audit", "--json", env=env)
        rec.cli("machines", "show", "web-01", "--json", env=env)
        rec.cli("keys", "revoke", "ci", env=env)
        assert rec.cli("status", env={"NIXFLEET_API_KEY": deploy}, ok=False).returncode == 6
        cmdline = Path(f"/proc/{cp.proc.pid}/cmdline").read_bytes().decode() if cp.proc else ""
    finally:
        cp.stop()

    log = cp.log.read_text()
    assert " DEBUG " in log and "refused POST" in log, "the scenario should log at debug level"
    every = [admin, boot_key, machine, *created]
    for secret in every:
        assert secret not in log, "a secret reached the control plane's log"
        assert secret not in cmdline, "a secret is on the control plane's command line"
        for i, (args, result) in enumerate(rec.runs):
            assert all(secret not in a for a in args), f"secret on argv of {args}"
            assert secret not in result.stderr, f"secret on stderr of {args}"
            if created.get(secret) == i:
                assert result.stdout.strip() == secret  # printed once, alone, to stdout
            else:
                assert secret not in result.stdout, f"secret on stdout of {args}"


def test_api_key_flag_and_file_mode_check(control_plane: ControlPlane, tmp_path: Path) -> None:
    url = control_plane.url
    loose = tmp_path / "loose.key"
    loose.write_text(control_plane.admin_key)
    loose.chmod(0o644)
    result = run_cli("--control-plane-url", url, "--api-key-file", str(loose), "keys", "list")
    assert result.returncode == 2 and "chmod 600" in result.stderr
    assert control_plane.admin_key not in result.stderr + result.stdout
    loose.chmod(0o600)
    assert (
        run_cli("--control-plane-url", url, "--api-key-file", str(loose), "keys", "list").returncode
        == 0
    )
    # --api-key works (convenience; docs say env/file is the safe way), and a bad key is exit 6.
    ok = run_cli("--control-plane-url", url, "--api-key", control_plane.admin_key, "audit")
    assert ok.returncode == 0
    bad = run_cli("--control-plane-url", url, "audit", env={"NIXFLEET_API_KEY": "nfk_wrong"})
    assert bad.returncode == 6 and "nfk_wrong" not in bad.stderr


def test_host_keys_list_and_revoke_work_without_the_network(tmp_path: Path) -> None:
    db = tmp_path / "nixfleet.db"
    assert host_cli(db, "keys", "create", "--name", "ops").returncode == 0
    assert host_cli(db, "keys", "create", "--name", "ops").returncode == 4  # exists
    assert host_cli(db, "keys", "create", "--name", "../x").returncode == 7
    revoked = host_cli(db, "keys", "revoke", "ops")
    assert revoked.returncode == 0, revoked.stderr
    assert host_cli(db, "keys", "list").stdout == ""
    assert "revoked" in host_cli(db, "keys", "list", "--all").stdout
    assert host_cli(db, "keys", "revoke", "ops").returncode == 3


@pytest.mark.parametrize(
    "argv",
    [
        ["keys"],
        ["keys", "create"],
        ["keys", "list"],
        ["keys", "revoke"],
        ["enroll-tokens"],
        ["enroll-tokens", "create"],
        ["enroll-tokens", "list"],
        ["enroll-tokens", "revoke"],
        ["audit"],
        ["machines", "rotate-token"],
        ["machines", "revoke-token"],
    ],
)
def test_every_security_command_help_has_an_example(argv: list[str]) -> None:
    result = run_cli(*argv, "--help")
    assert result.returncode == 0 and "Example:" in result.stdout, result.stdout


def test_enroll_tokens_create_refuses_bad_durations() -> None:
    result = run_cli("enroll-tokens", "create", "--expires", "soon")
    assert result.returncode == 2 and "24h" in result.stderr
