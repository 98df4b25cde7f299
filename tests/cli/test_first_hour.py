"""Issue 12: the CLI surprises an operator met in their first hour, each reproduced.

The real `nixfleet` CLI (a subprocess), the real control plane on 127.0.0.1, a real
pseudo-terminal where terminal behaviour matters.
"""

from __future__ import annotations

import functools
import http.server
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ControlPlane, run_cli, run_on_tty
from conftest import wait_until as wait_for
from ports import free_port

from nixfleet.client import Client

GEN = "/nix/store/" + "a" * 32 + "-nixos-system-web-01"
DOWN_GUIDANCE = "While the control plane is down"


def env(cp: ControlPlane) -> dict[str, str]:
    return {"NIXFLEET_CONTROL_PLANE_URL": cp.url, "NIXFLEET_API_KEY": cp.admin_key}


class Running:
    """A CLI subprocess whose stdout and stderr are collected as they come."""

    def __init__(self, args: list[str], extra_env: dict[str, str]) -> None:
        full = {k: v for k, v in os.environ.items() if not k.startswith("NIXFLEET_")}
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full | extra_env,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=self._drain, args=(stream, sink), daemon=True).start()

    @staticmethod
    def _drain(stream: object, sink: list[str]) -> None:
        for line in iter(stream.readline, b""):  # type: ignore[attr-defined]
            sink.append(line.decode())

    def stderr(self) -> str:
        return "".join(self.err)

    def stdout(self) -> str:
        return "".join(self.out)

    def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=30)


def nixfleet(*args: str) -> list[str]:
    return [sys.executable, "-m", "nixfleet.cli", *args]


# --- where the control plane is, and what answers there ---------------------------


def test_a_url_without_a_scheme_is_a_usage_error_naming_the_fix() -> None:
    r = run_cli("--control-plane-url", "127.0.0.1:8470", "status")
    assert r.returncode == 2, r.stderr
    assert "use http://127.0.0.1:8470" in r.stderr
    assert DOWN_GUIDANCE not in r.stderr
    r = run_cli("status", env={"NIXFLEET_CONTROL_PLANE_URL": "fleet.example.com:8470"})
    assert r.returncode == 2 and "use http://fleet.example.com:8470" in r.stderr


def test_https_against_a_plain_control_plane_is_one_line(control_plane: ControlPlane) -> None:
    url = control_plane.url.replace("http://", "https://")
    r = run_cli("status", env={**env(control_plane), "NIXFLEET_CONTROL_PLANE_URL": url})
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1, r.stderr
    assert "speaks plain HTTP, not TLS" in r.stderr and "use http://" in r.stderr


@pytest.fixture
def web_server(tmp_path: Path) -> Iterator[str]:
    """Some other web server (Python's own, serving an empty directory)."""

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_server_that_is_not_nixfleet_is_named_in_one_line(web_server: str) -> None:
    r = run_cli("status", env={"NIXFLEET_CONTROL_PLANE_URL": web_server})
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1, r.stderr
    assert f"{web_server} is not a nixfleet control plane" in r.stderr
    assert "text/html" in r.stderr and DOWN_GUIDANCE not in r.stderr


def test_debug_prints_the_traceback_and_keeps_the_exit_code() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    plain = run_cli("status", env={"NIXFLEET_CONTROL_PLANE_URL": url})
    assert plain.returncode == 5 and "Traceback" not in plain.stderr
    debug = run_cli("--debug", "status", env={"NIXFLEET_CONTROL_PLANE_URL": url})
    assert debug.returncode == 5
    assert "Traceback (most recent call last)" in debug.stderr and DOWN_GUIDANCE in debug.stderr


# --- the control plane's own start ------------------------------------------------------


def test_port_in_use_is_one_line_and_creates_nothing(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    db = tmp_path / "second" / "nixfleet.db"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "nixfleet.controlplane.main",
            "--db",
            str(db),
            "--listen",
            f"127.0.0.1:{control_plane.port}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1, done.stderr
    assert "nixfleet-control-plane: error: cannot listen on 127.0.0.1:" in done.stderr
    assert "already in use" in done.stderr and "--listen" in done.stderr
    assert not db.parent.exists()


def test_ctrl_c_stops_the_control_plane_with_130(tmp_path: Path) -> None:
    port = free_port()
    cp = Running(
        [
            sys.executable,
            "-m",
            "nixfleet.controlplane.main",
            "--db",
            str(tmp_path / "x.db"),
            "--listen",
            f"127.0.0.1:{port}",
        ],
        {},
    )
    wait_for("the control plane", lambda: "listening on" in cp.stderr())
    assert cp.interrupt() == 130
    assert "Traceback" not in cp.stderr() and "stopped" in cp.stderr()


def test_ctrl_c_stops_the_agent_with_130(tmp_path: Path) -> None:
    agent = Running(
        [
            sys.executable,
            "-m",
            "nixfleet.agent.main",
            "--machine-id",
            "web-01",
            "--control-plane-url",
            f"http://127.0.0.1:{free_port()}",
            "--state-dir",
            str(tmp_path / "state"),
            "--profile",
            str(tmp_path / "profile"),
            "--current-system",
            str(tmp_path / "current"),
            "--poll-interval",
            "1",
        ],
        {},
    )
    wait_for("the agent's first cycle", lambda: "no machine token" in agent.stderr())
    assert agent.interrupt() == 130
    assert "Traceback" not in agent.stderr()


# --- watching and waiting -----------------------------------------------------------


def test_status_watch_survives_a_control_plane_restart(control_plane: ControlPlane) -> None:
    control_plane.register("web-01")
    watch = Running(nixfleet("status", "--watch", "--interval", "0.2"), env(control_plane))
    wait_for("the first table", lambda: "web-01" in watch.stdout())
    control_plane.stop()
    wait_for("the blip", lambda: "control plane unreachable, retrying" in watch.stderr())
    control_plane.start()
    wait_for("the recovery", lambda: "control plane is back" in watch.stderr())
    assert watch.proc.poll() is None  # still watching
    assert watch.interrupt() == 130
    assert watch.stderr().count("unreachable, retrying") == 1  # said once per outage
    # Not a terminal: the unchanged table was printed once, not every 0.2 s.
    assert watch.stdout().count("HOST ") == 1


def test_ctrl_c_on_a_terminal_exits_130(control_plane: ControlPlane) -> None:
    leader, follower = os.openpty()
    full = {k: v for k, v in os.environ.items() if not k.startswith("NIXFLEET_")}
    proc = subprocess.Popen(
        nixfleet("status", "--watch"),
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env=full | env(control_plane),
    )
    os.close(follower)
    seen = b""
    while b"machines yet" not in seen:
        seen += os.read(leader, 65536)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    os.close(leader)


def test_a_closed_pipe_ends_quietly(control_plane: ControlPlane) -> None:
    client = control_plane.client()
    for i in range(800):  # more than a pipe buffer of table
        client.register_machine(f"web-{i:04}", ["prod", "web", "region-eu"])
    cmd = f"{sys.executable} -m nixfleet.cli status | head -1; echo rc=${{PIPESTATUS[0]}} >&2"
    done = subprocess.run(
        ["bash", "-c", cmd],
        capture_output=True,
        text=True,
        env={**os.environ, **env(control_plane)},
        timeout=120,
        check=False,
    )
    assert done.stdout.split() == [
        "HOST",
        "LIFECYCLE",
        "CURRENT",
        "DESIRED",
        "SYNC",
        "HEALTH",
        "LAST",
        "REPORT",
        "TAGS",
    ]
    assert done.stderr.strip() in ("rc=141", "rc=0"), done.stderr


# --- tags, colours, secrets, empty fleets --------------------------------------------


def test_untag_of_a_tag_from_the_nixos_config_is_an_error(control_plane: ControlPlane) -> None:
    token = control_plane.register("web-01", ["canary"])
    Client(control_plane.url, token).report("web-01", {"current_generation": GEN, "tags": ["web"]})
    r = run_cli("machines", "untag", "web-01", "web", env=env(control_plane))
    assert r.returncode == 4
    assert "comes from the machine's NixOS config" in r.stderr
    assert "services.nixfleet-agent.tags" in r.stderr
    assert control_plane.machine("web-01")["tags"] == ["canary", "web"]
    r = run_cli("machines", "untag", "web-01", "canary", env=env(control_plane))
    assert r.returncode == 0 and control_plane.machine("web-01")["tags"] == ["web"]


def on_tty(args: list[str], extra_env: dict[str, str]) -> str:
    return run_on_tty(args, {k: v for k, v in os.environ.items() if k != "NO_COLOR"} | extra_env)


def test_color_follows_no_color_org_and_the_color_flag(control_plane: ControlPlane) -> None:
    control_plane.register("web-01")
    control_plane.set_desired("web-01", GEN)
    e = env(control_plane)
    assert "\x1b[" in on_tty(["status"], e | {"NO_COLOR": ""})  # empty: not set, says the spec
    assert "\x1b[" not in on_tty(["status"], e | {"NO_COLOR": "1"})
    assert "\x1b[" not in on_tty(["--color", "never", "status"], e)
    assert "\x1b[" in on_tty(["--color", "always", "status"], e | {"NO_COLOR": "1"})
    piped = run_cli("--color", "always", "status", env=e)
    assert piped.returncode == 0 and "\x1b[" in piped.stdout
    assert "\x1b[" not in run_cli("status", env=e).stdout


def test_keys_create_output_is_0600_whatever_the_umask(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    key_file = tmp_path / "ci.key"
    old = os.umask(0o022)
    try:
        r = run_cli(
            "keys",
            "create",
            "--name",
            "ci",
            "--role",
            "deploy",
            "-o",
            str(key_file),
            env=env(control_plane),
        )
    finally:
        os.umask(old)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""  # the secret went to the file only
    assert key_file.stat().st_mode & 0o777 == 0o600
    # The file is exactly what the CLI reads back.
    r = run_cli(
        "--api-key-file",
        str(key_file),
        "status",
        "--json",
        env={"NIXFLEET_CONTROL_PLANE_URL": control_plane.url},
    )
    assert r.returncode == 0, r.stderr
    # Never over an existing file, and then no key is made either.
    r = run_cli(
        "keys",
        "create",
        "--name",
        "ci2",
        "--role",
        "deploy",
        "-o",
        str(key_file),
        env=env(control_plane),
    )
    assert r.returncode == 2 and "exists" in r.stderr
    names = [k["name"] for k in control_plane.client().keys()["keys"]]
    assert "ci2" not in names and "ci" in names


def test_the_host_key_command_writes_0600_too(tmp_path: Path) -> None:
    db, key_file = tmp_path / "fleet.db", tmp_path / "ops.key"
    host = [sys.executable, "-m", "nixfleet.controlplane.main", "--db", str(db), "keys"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*host, *args], capture_output=True, text=True, timeout=60, check=False
        )

    old = os.umask(0o022)
    try:
        made = run("create", "--name", "ops", "--output", str(key_file))
    finally:
        os.umask(old)
    assert made.returncode == 0, made.stderr
    assert made.stdout == "" and "in " + str(key_file) in made.stderr
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert key_file.read_text().startswith("nfk_")
    again = run("create", "--name", "ops2", "--output", str(key_file))
    assert again.returncode == 2 and "exists" in again.stderr
    assert [line.split("\t")[0] for line in run("list").stdout.splitlines()] == ["ops"]


def test_an_empty_fleet_says_what_to_do(control_plane: ControlPlane) -> None:
    r = run_cli("status", env=env(control_plane))
    assert r.returncode == 0 and r.stdout == ""
    assert "no machines yet" in r.stderr and "nixfleet machines register" in r.stderr
    r = run_cli("machines", "list", env=env(control_plane))
    assert r.returncode == 0 and "no machines yet" in r.stderr
    r = run_cli("status", "--tags", "prod, web", env=env(control_plane))
    assert "no machine carries all of the tags prod,web" in r.stderr
    for args in (("rollout", "list"), ("release", "list")):
        r = run_cli(*args, env=env(control_plane))
        assert r.returncode == 0 and "yet" in r.stderr, args


def test_a_fresh_fleet_shows_the_no_desired_count(control_plane: ControlPlane) -> None:
    control_plane.register("web-01")
    control_plane.register("web-02")
    r = run_cli("status", env=env(control_plane))
    assert r.returncode == 0
    assert r.stdout.splitlines()[-1] == "0/2 machines in sync, 2 no desired"
    assert "no machine has a desired generation yet" in r.stderr
    assert "nixfleet release create" in r.stderr


def test_machines_show_has_uptime_and_no_empty_health_heading(
    control_plane: ControlPlane,
) -> None:
    token = control_plane.register("web-01")
    Client(control_plane.url, token).report(
        "web-01",
        {
            "current_generation": GEN,
            "uptime_seconds": 90061,
            "health": {"all_passed": True, "results": []},
        },
    )
    r = run_cli("machines", "show", "web-01", env=env(control_plane))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any(
        line.split() == ["uptime", "1d", "1h", "(at", "the", "last", "report)"] for line in lines
    )
    assert "health checks:" not in lines
    assert any(
        line.split()[:2] == ["health", "checks"] and "none configured" in line for line in lines
    )


# --- contexts ------------------------------------------------------------------------------


def test_contexts_choose_the_fleet(control_plane: ControlPlane, tmp_path: Path) -> None:
    key_file = tmp_path / "prod.key"
    key_file.write_text(control_plane.admin_key + "\n")
    key_file.chmod(0o600)
    cfg = {"NIXFLEET_CONFIG": str(tmp_path / "config.toml")}
    down = f"http://127.0.0.1:{free_port()}"

    def cli(*args: str, **extra: str) -> object:
        return run_cli(*args, env=cfg | extra)

    r = run_cli("config", "get-contexts", env=cfg)
    assert r.returncode == 0 and "nixfleet config set-context" in r.stderr
    r = run_cli(
        "config",
        "set-context",
        "prod",
        "--control-plane-url",
        control_plane.url,
        "--api-key-file",
        str(key_file),
        env=cfg,
    )
    assert r.returncode == 0, r.stderr
    assert (
        run_cli("config", "set-context", "lab", "--control-plane-url", down, env=cfg).returncode
        == 0
    )
    listing = run_cli("config", "get-contexts", env=cfg).stdout.splitlines()
    assert listing[1].split()[:2] == ["lab", down]  # sorted; prod, the first made, is current
    assert listing[2].split()[:3] == ["*", "prod", control_plane.url]
    assert run_cli("status", "--json", env=cfg).returncode == 0
    assert run_cli("--context", "lab", "status", env=cfg).returncode == 5
    assert run_cli("status", env=cfg | {"NIXFLEET_CONTEXT": "lab"}).returncode == 5
    # A context named explicitly beats the environment's URL; the current one does not.
    assert (
        run_cli(
            "--context", "prod", "status", "--json", env=cfg | {"NIXFLEET_CONTROL_PLANE_URL": down}
        ).returncode
        == 0
    )
    assert run_cli("status", env=cfg | {"NIXFLEET_CONTROL_PLANE_URL": down}).returncode == 5
    r = run_cli("--context", "nope", "status", env=cfg)
    assert r.returncode == 2 and "no context 'nope'; known: lab, prod" in r.stderr
    view = run_cli("config", "view", env=cfg)
    assert view.returncode == 0, view.stderr
    assert control_plane.admin_key not in view.stdout + view.stderr
    assert control_plane.admin_key[:6] + "…" in view.stdout
    assert "context prod" in view.stdout and str(key_file) in view.stdout
    assert run_cli("config", "use-context", "lab", env=cfg).returncode == 0
    assert run_cli("config", "current-context", env=cfg).stdout.strip() == "lab"
    assert run_cli("status", env=cfg).returncode == 5
    assert run_cli("config", "use-context", "nope", env=cfg).returncode == 3


# --- completion ------------------------------------------------------------------------


def complete(words: str, extra_env: dict[str, str]) -> list[str]:
    parts = words.split(" ")
    r = run_cli(
        env=extra_env
        | {
            "_NIXFLEET_COMPLETE": "bash_complete",
            "COMP_WORDS": words,
            "COMP_CWORD": str(len(parts) - 1),
        }
    )
    assert r.returncode == 0, r.stderr
    return [line.split(",", 1)[1] for line in r.stdout.splitlines() if line]


def test_completion_scripts_and_dynamic_values(control_plane: ControlPlane, tmp_path: Path) -> None:
    for shell, marker in (
        ("bash", "complete -o"),
        ("zsh", "#compdef nixfleet"),
        ("fish", "_NIXFLEET_COMPLETE=fish_complete"),
    ):
        r = run_cli("completion", shell)
        assert r.returncode == 0 and marker in r.stdout, shell
    assert run_cli("completion", "tcsh").returncode == 2
    control_plane.register("web-01", ["prod", "web"])
    control_plane.register("web-02", ["prod"])
    control_plane.register("db-01", ["db"])
    e = env(control_plane) | {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    assert complete("nixfleet machines show web", e) == ["web-01", "web-02"]
    assert complete("nixfleet status --tags prod,", e) == ["prod,db", "prod,web"]
    assert complete("nixfleet machines untag web-01 d", e) == ["db"]
    # The control plane goes away: the cache still answers, and nothing is printed.
    control_plane.stop()
    assert complete("nixfleet machines show d", e) == ["db-01"]
    fresh = env(control_plane) | {"XDG_CACHE_HOME": str(tmp_path / "other")}
    assert complete("nixfleet machines show w", fresh) == []


def test_completion_offers_rollout_names_and_release_ids(control_plane: ControlPlane) -> None:
    token = control_plane.register("web-01", ["web"])
    Client(control_plane.url, token).report("web-01", {"current_generation": GEN})
    rel = control_plane.client().register_release(
        {
            "entries": [
                {
                    "hostname": "web-01",
                    "store_path": GEN,
                    "platform": "x86_64-linux",
                    "tags": ["web"],
                }
            ]
        }
    )
    control_plane.client().apply_rollout(
        {
            "version": 1,
            "name": "web-rollout",
            "release": rel["id"],
            "target": {"tags": ["web"]},
            "strategy": "all-at-once",
        }
    )
    e = env(control_plane)
    assert complete("nixfleet rollout status web", e) == ["web-rollout"]
    assert complete("nixfleet release show rel", e) == [rel["id"]]
    assert complete("nixfleet deploy --release r", e) == [rel["id"]]
