"""The NixOS modules under the REAL nixpkgs module system, and the units they render.

`lib.evalModules` from the pinned nixpkgs lib (NIXFLEET_NIXPKGS_LIB, see units.py)
evaluates modules/agent.nix and modules/control-plane.nix; tests/nix/render-units.nix
turns the evaluated `systemd.services.*` into unit files the way NixOS does, and
`systemd-analyze verify` must accept every one of them without a word on stderr.
The same rendered files run under systemd as PID 1 in tests/system/.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import load_file, new_control_plane

from nixfleet import schemas
from nixfleet.agent.config import load_config

units = load_file("nixfleet_test_units", Path(__file__).resolve().parent / "units.py")

ROOT: Path = units.ROOT
EVAL = ROOT / "tests" / "nix" / "eval-modules.nix"

pytestmark = pytest.mark.nix

SEED_AGENT = """services.nixfleet-agent = {
  enable = true;
  controlPlaneUrl = "https://fleet.example.com";
  tags = ["prod" "web" "region-eu"];
};"""
BOTH = (
    "{ "
    + SEED_AGENT
    + ' services.nixfleet-agent.tokenFile = "/run/secrets/nixfleet-token";'
    + " services.nixfleet-control-plane = { enable = true;"
    + ' adminKeyFile = "/run/secrets/nixfleet-admin-key"; }; }'
)


nix_eval = units.nix_eval


@pytest.fixture(scope="module")
def lib() -> str:
    path: str = units.require_lib()
    return path


def eval_real(lib: str, config: str) -> Any:
    return nix_eval(
        f"""let r = import {EVAL} {{ lib = import {lib}; config = {config}; }};
            in {{ inherit (r) options failedAssertions warnings agent controlPlane firewall
                  postgresql; }}"""
    )


def eval_error(lib: str, config: str) -> str:
    done = nix_eval(
        f"(import {EVAL} {{ lib = import {lib}; config = {config}; }}).agent", check=False
    )
    assert done.returncode != 0, f"evaluation succeeded: {done.stdout}"
    return str(done.stderr)


def declared(module: Path) -> set[str]:
    out = nix_eval(
        f"map (o: o.name) (import {ROOT}/tests/nix/option-declarations.nix "
        f"{{ module = {module}; }})"
    )
    return set(out)


# --- evaluation -------------------------------------------------------------------


def test_real_lib_agrees_with_declarations(lib: str) -> None:
    real = {o["name"] for o in eval_real(lib, "{ }")["options"]}
    modules = ("agent.nix", "control-plane.nix")
    recorded = set().union(*(declared(ROOT / "modules" / m) for m in modules))
    assert real == recorded


def test_seed_config_renders_what_the_agent_accepts(lib: str) -> None:
    out = eval_real(lib, "{ " + SEED_AGENT + " services.nixfleet-control-plane.enable = true; }")
    assert out["failedAssertions"] == [] and out["warnings"] == []
    agent = out["agent"]["config"]
    assert agent["tags"] == ["prod", "web", "region-eu"]
    assert agent["use_systemd_run"] is True
    assert agent["profile"] == "/nix/var/nix/profiles/system"
    schemas.validate("agent-config", agent, what="rendered agent config")
    unit = out["agent"]["unit"]
    assert unit["restartIfChanged"] is False
    assert unit["serviceConfig"]["Restart"] == "always"
    cp = out["controlPlane"]
    assert cp["config"]["db"] == "/var/lib/nixfleet/nixfleet.db"
    assert cp["config"]["listen"] == "127.0.0.1:8470"
    assert cp["unit"]["serviceConfig"]["DynamicUser"] is True


def test_reboot_options_render_into_the_agents_config(lib: str, tmp_path: Path) -> None:
    """booted_system / reboot_command (DESIGN §11 Reboots): defaults and set values."""
    seed = eval_real(lib, "{ " + SEED_AGENT + " }")["agent"]["config"]
    assert seed["booted_system"] == "/run/booted-system"
    assert seed["reboot_command"] == ["systemctl", "reboot"]
    out = eval_real(
        lib,
        "{ "
        + SEED_AGENT
        + ' services.nixfleet-agent.bootedSystem = "/run/test-booted";'
        + ' services.nixfleet-agent.rebootCommand = ["/run/wrappers/bin/record" "reboot"]; }',
    )
    assert out["failedAssertions"] == []
    agent = out["agent"]["config"]
    assert agent["booted_system"] == "/run/test-booted"
    assert agent["reboot_command"] == ["/run/wrappers/bin/record", "reboot"]
    schemas.validate("agent-config", agent, what="rendered agent config")
    (tmp_path / "agent.json").write_text(json.dumps(agent))
    config = load_config(tmp_path / "agent.json")
    assert config.booted_system == "/run/test-booted"
    assert config.reboot_command == ("/run/wrappers/bin/record", "reboot")
    for bad in ('bootedSystem = "run/x"', "rebootCommand = [ ]", 'rebootCommand = [ "" ]'):
        error = eval_error(lib, "{ " + SEED_AGENT + f" services.nixfleet-agent.{bad}; }}")
        assert "is not of type" in error, bad


def test_agent_config_lives_at_a_path_stable_across_generations(lib: str) -> None:
    """The tags defect: the unit must not change when only the agent's settings do."""
    web = units.render(lib, "{ " + SEED_AGENT + " }")
    api = units.render(lib, "{ " + SEED_AGENT.replace('"web"', '"api"') + " }")
    name = "nixfleet-agent.service"
    assert web["units"][name]["text"] == api["units"][name]["text"]
    assert "--config /etc/nixfleet/agent.json" in web["units"][name]["text"]
    assert web["etc"]["nixfleet/agent.json"] != api["etc"]["nixfleet/agent.json"]
    tags = json.loads(Path(api["etc"]["nixfleet/agent.json"]).read_text())["tags"]
    assert tags == ["prod", "api", "region-eu"]


def test_agent_settings_are_freeform_and_never_silently_override(lib: str) -> None:
    out = eval_real(
        lib,
        "{ " + SEED_AGENT + ' services.nixfleet-agent.settings.current_system = "/run/cs"; }',
    )
    assert out["agent"]["config"]["current_system"] == "/run/cs"
    error = eval_error(
        lib,
        "{ " + SEED_AGENT + ' services.nixfleet-agent.settings.control_plane_url = "https://x"; }',
    )
    assert "conflicting definition values" in error and "control_plane_url" in error


def test_control_plane_settings_are_what_the_server_accepts(lib: str, tmp_path: Path) -> None:
    from nixfleet import settings as config

    out = eval_real(
        lib,
        "{ services.nixfleet-control-plane = { enable = true; "
        'listen.address = "::1"; listen.port = 9000; openFirewall = true; '
        "settings = { workers = 2; stale_after = 600; }; }; }",
    )
    assert out["failedAssertions"] == []
    rendered = out["controlPlane"]["config"]
    assert rendered["listen"] == "[::1]:9000"
    assert out["firewall"] == [9000]
    assert rendered["workers"] == 2 and rendered["threads"] == 8
    f = tmp_path / "settings.json"
    f.write_text(json.dumps(rendered))
    settings = config.load(f)
    assert (settings.workers, settings.stale_after) == (2, 600)


def test_listen_port_is_a_port(lib: str) -> None:
    done = nix_eval(
        f"(import {EVAL} {{ lib = import {lib}; config = "
        "{ services.nixfleet-control-plane = { enable = true; listen.port = 70000; }; }; "
        "}).controlPlane",
        check=False,
    )
    assert done.returncode != 0 and "listen.port" in done.stderr


@pytest.mark.parametrize(
    "option",
    [
        "services.nixfleet-agent.tokenFile",
        "services.nixfleet-agent.enrollTokenFile",
        "services.nixfleet-control-plane.adminKeyFile",
        "services.nixfleet-control-plane.database.passwordFile",
    ],
)
def test_secret_files_refuse_store_paths(lib: str, option: str) -> None:
    store = "/nix/store/00000000000000000000000000000000-token"
    done = nix_eval(
        f"let r = import {EVAL} {{ lib = import {lib}; config = {{ "
        + SEED_AGENT
        + f' services.nixfleet-control-plane.enable = true; {option} = "{store}"; }}; }};'
        + " in [ r.agent r.controlPlane ]",
        check=False,
    )
    assert done.returncode != 0
    assert option in done.stderr and "not in the Nix store" in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ('controlPlaneUrl = "http://fleet.example.com";', "must be an\nhttps:// URL"),
        ('controlPlaneUrl = "https://f"; machineId = "-x";', "is not a valid machine id"),
        ('controlPlaneUrl = "https://f"; backoff.initial = 900;', "must not\nexceed"),
        ('controlPlaneUrl = "https://f"; settings.use_systemd_run = false;', "must stay true"),
    ],
)
def test_assertions(lib: str, config: str, needle: str) -> None:
    out = eval_real(lib, "{ services.nixfleet-agent = { enable = true; " + config + " }; }")
    assert any(needle in message for message in out["failedAssertions"]), out["failedAssertions"]


# --- the control plane's database ---------------------------------------------------

CP_UNIT = "nixfleet-control-plane.service"
CREDENTIALS = f"/run/credentials/{CP_UNIT}"
LOCAL_URL = "postgresql:///nixfleet?host=/run/postgresql"
REMOTE = "postgresql://nixfleet@db.example.com/nixfleet"
PGPASS = "/run/secrets/nixfleet-pgpass"


def cp_with(database: str) -> str:
    """A control plane with the admin key and `database` (Nix attribute definitions)."""
    return (
        "{ services.nixfleet-control-plane = { enable = true; "
        f'adminKeyFile = "/run/secrets/nixfleet-admin-key"; {database} }}; }}'
    )


def loaded(rendered: dict[str, Any], tmp_path: Path) -> Any:
    from nixfleet import settings as config

    f = tmp_path / "settings.json"
    f.write_text(json.dumps(rendered))
    return config.load(f)


def test_without_database_options_the_sqlite_file_stays(lib: str, tmp_path: Path) -> None:
    """An existing SQLite installation: `db` in the state directory, the unit's own
    dynamic user name, no PostgreSQL, no new dependency or credential."""
    out = eval_real(lib, cp_with(""))
    assert out["failedAssertions"] == []
    cp = out["controlPlane"]
    assert cp["config"]["db"] == "/var/lib/nixfleet/nixfleet.db"
    assert "database_url" not in cp["config"]
    unit = cp["unit"]
    assert "User" not in unit["serviceConfig"] and unit["serviceConfig"]["DynamicUser"] is True
    assert unit["after"] == ["network.target"] and unit.get("requires", []) == []
    assert unit["serviceConfig"]["LoadCredential"] == ["admin-key:/run/secrets/nixfleet-admin-key"]
    assert out["postgresql"] == {"enable": False, "ensureDatabases": [], "ensureUsers": []}
    database = loaded(cp["config"], tmp_path).database
    assert (database.backend, str(database.path)) == ("sqlite", "/var/lib/nixfleet/nixfleet.db")


def test_create_locally_runs_postgresql_and_connects_by_peer(lib: str, tmp_path: Path) -> None:
    out = eval_real(lib, cp_with("database.createLocally = true;"))
    assert out["failedAssertions"] == [] and out["warnings"] == []
    assert out["postgresql"] == {
        "enable": True,
        "ensureDatabases": ["nixfleet"],
        "ensureUsers": [{"name": "nixfleet", "ensureDBOwnership": True, "ensureClauses": {}}],
    }
    cp = out["controlPlane"]
    assert cp["config"]["database_url"] == LOCAL_URL and "db" not in cp["config"]
    service = cp["unit"]["serviceConfig"]
    # Peer authentication maps the OS user name to the role ensureUsers creates.
    assert (service["User"], service["DynamicUser"]) == ("nixfleet", True)
    assert service["LoadCredential"] == ["admin-key:/run/secrets/nixfleet-admin-key"]
    for key in ("after", "requires"):
        assert {"postgresql.service", "postgresql.target"} <= set(cp["unit"][key]), key
    database = loaded(cp["config"], tmp_path).database
    assert (database.backend, database.conninfo) == ("postgresql", LOCAL_URL)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (REMOTE, f"{REMOTE}?passfile={CREDENTIALS}/pgpass"),
        (
            f"{REMOTE}?sslmode=verify-full",
            f"{REMOTE}?sslmode=verify-full&passfile={CREDENTIALS}/pgpass",
        ),
    ],
)
def test_password_file_is_a_credential_named_as_libpq_passfile(
    lib: str, tmp_path: Path, url: str, expected: str
) -> None:
    from psycopg import conninfo

    out = eval_real(lib, cp_with(f'database.url = "{url}"; database.passwordFile = "{PGPASS}";'))
    assert out["failedAssertions"] == []
    cp = out["controlPlane"]
    assert cp["config"]["database_url"] == expected and "db" not in cp["config"]
    assert cp["unit"]["serviceConfig"]["LoadCredential"] == [
        "admin-key:/run/secrets/nixfleet-admin-key",
        f"pgpass:{PGPASS}",
    ]
    # A server elsewhere: no local PostgreSQL, no ordering on it, the usual user.
    assert out["postgresql"]["enable"] is False
    assert cp["unit"].get("requires", []) == [] and "User" not in cp["unit"]["serviceConfig"]
    database = loaded(cp["config"], tmp_path).database
    assert database.backend == "postgresql"
    assert conninfo.conninfo_to_dict(database.conninfo)["passfile"] == f"{CREDENTIALS}/pgpass"


@pytest.mark.parametrize(
    ("url", "backend"),
    [(REMOTE + "?sslmode=require", "postgresql"), ("sqlite:/var/lib/nixfleet/other.db", "sqlite")],
)
def test_a_url_without_password_file_is_passed_as_given(
    lib: str, tmp_path: Path, url: str, backend: str
) -> None:
    out = eval_real(lib, cp_with(f'database.url = "{url}";'))
    assert out["failedAssertions"] == []
    cp = out["controlPlane"]
    assert cp["config"]["database_url"] == url and "db" not in cp["config"]
    assert cp["unit"]["serviceConfig"]["LoadCredential"] == [
        "admin-key:/run/secrets/nixfleet-admin-key"
    ]
    assert loaded(cp["config"], tmp_path).database.backend == backend


@pytest.mark.parametrize(
    ("database", "needle"),
    [
        (
            f'database.createLocally = true; database.url = "{REMOTE}";',
            "database.createLocally connects to the local\nPostgreSQL by itself",
        ),
        (f'database.passwordFile = "{PGPASS}";', "database.passwordFile needs"),
        (
            f'database.createLocally = true; database.passwordFile = "{PGPASS}";',
            "database.passwordFile needs",
        ),
        (
            f'database.url = "sqlite:/var/lib/nixfleet/x.db"; database.passwordFile = "{PGPASS}";',
            "database.passwordFile needs",
        ),
        ('database.url = "mysql://nixfleet@db/nixfleet";', 'or sqlite:PATH, not "mysql://'),
        ('database.url = "/var/lib/nixfleet/x.db";', 'or sqlite:PATH, not "/var/lib'),
        ('database.url = "postgresql://nixfleet:s3cret@db/nixfleet";', "holds a password"),
        ('database.url = "postgresql://db/nixfleet?user=n&password=s3cret";', "holds a password"),
        (
            f'database.url = "{REMOTE}?passfile=/etc/pgpass"; database.passwordFile = "{PGPASS}";',
            "names a passfile= already",
        ),
    ],
)
def test_database_assertions(lib: str, database: str, needle: str) -> None:
    failed = eval_real(lib, cp_with(database))["failedAssertions"]
    assert len(failed) == 1 and needle in failed[0], failed


# --- the rendered units -----------------------------------------------------------


def lines(text: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(key + "=")]


def test_rendered_units_follow_nixos_conventions(lib: str) -> None:
    out = units.render(lib, BOTH)
    agent = out["units"]["nixfleet-agent.service"]["text"]
    cp = out["units"]["nixfleet-control-plane.service"]["text"]
    assert lines(agent, "Requires") == ["nix-daemon.socket"]
    assert "nix-daemon.socket" in lines(agent, "After")[0].split()
    assert lines(agent, "Type") == lines(cp, "Type") == ["exec"]
    assert lines(agent, "X-RestartIfChanged") == ["false"]
    assert lines(agent, "LoadCredential") == ["token:/run/secrets/nixfleet-token"]
    assert lines(cp, "LoadCredential") == ["admin-key:/run/secrets/nixfleet-admin-key"]
    assert lines(agent, "WantedBy") == lines(cp, "WantedBy") == ["multi-user.target"]
    path = next(e for e in lines(agent, "Environment") if e.startswith('"PATH='))
    entries = path.strip('"').removeprefix("PATH=").split(":")
    assert len(entries) == len(set(entries)), f"duplicate PATH entries: {entries}"
    assert sum("-systemd/bin" in e for e in entries) == 1


def test_script_becomes_an_executable_job_script(lib: str, tmp_path: Path) -> None:
    """`script`, `path` and `environment` as NixOS renders them (no module of ours uses
    `script` today; a later one must not find the renderer wanting)."""
    out = units.render(
        lib,
        '{ systemd.services.demo = { description = "demo"; '
        'environment.GREETING = "hi there"; path = [ ]; '
        'script = "echo $GREETING"; serviceConfig.Type = "oneshot"; }; }',
        script_dir=str(tmp_path / "scripts"),
    )
    written = units.write(out, tmp_path / "units", tmp_path / "scripts")
    text = written.units["demo.service"].read_text()
    assert lines(text, "ExecStart") == [f"{tmp_path}/scripts/demo-start "]
    assert 'Environment="GREETING=hi there"' in text.splitlines()
    script = tmp_path / "scripts" / "demo-start"
    assert os.access(script, os.X_OK)
    done = subprocess.run(
        [str(script)], capture_output=True, text=True, env={"GREETING": "ok"}, check=True
    )
    assert done.stdout == "ok\n"


def test_systemd_analyze_verify_is_silent(lib: str, tmp_path: Path) -> None:
    if units.systemd_analyze() is None:
        # Not a silent pass: tests/system/test_units.py verifies the same units inside
        # its container, and that tier may not skip under CI.
        pytest.skip(
            "systemd-analyze is missing here (Debian: apt-get install systemd); "
            "tests/system/test_units.py verifies the units inside its container"
        )
    out = units.render(lib, BOTH, packages=units.real_packages(), script_dir=str(tmp_path / "s"))
    written = units.write(out, tmp_path / "units", tmp_path / "s")
    for path in written.units.values():
        code, output = units.verify([path])
        assert (code, output) == (0, ""), f"{path.name}:\n{output}"


@pytest.mark.parametrize(
    "database",
    [
        "database.createLocally = true;",
        f'database.url = "{REMOTE}"; database.passwordFile = "{PGPASS}";',
    ],
)
def test_postgresql_variants_verify_silently(lib: str, tmp_path: Path, database: str) -> None:
    if units.systemd_analyze() is None:
        pytest.skip("systemd-analyze is missing here (Debian: apt-get install systemd)")
    out = units.render(
        lib, cp_with(database), packages=units.real_packages(), script_dir=str(tmp_path / "s")
    )
    written = units.write(out, tmp_path / "units", tmp_path / "s")
    for name, text in units.POSTGRESQL_UNITS.items():
        (tmp_path / "units" / name).write_text(text)
    code, output = units.verify([written.units[CP_UNIT]])
    assert (code, output) == (0, ""), output


def test_the_control_plane_unit_starts_only_once_ready(lib: str, tmp_path: Path) -> None:
    """ExecStartPost probes GET /ready with the unit's own config: the rendered command
    line, run as systemd would, returns 0 against a real control plane listening there."""
    cp = new_control_plane(tmp_path / "cp")
    config = (
        "{ services.nixfleet-control-plane = { enable = true; "
        f'listen.address = "0.0.0.0"; listen.port = {cp.port}; }}; }}'
    )
    out = units.render(lib, config, packages=units.real_packages(), script_dir=str(tmp_path / "s"))
    text = out["units"]["nixfleet-control-plane.service"]["text"]
    (start,) = lines(text, "ExecStart")
    (post,) = lines(text, "ExecStartPost")
    argv = post.split()
    assert argv[:3] == start.split()[:3]  # the same program and settings file
    assert argv[3:] == ["wait-ready", "--timeout", "60"]
    cp.start()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=70, check=False)
    finally:
        cp.stop()
    assert done.returncode == 0, done.stderr
    assert f"0.0.0.0:{cp.port} is ready" in done.stderr
