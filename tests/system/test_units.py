"""The modules' own units under systemd as PID 1 (a systemd-nspawn container).

One container for the module: the units are rendered INSIDE it from
modules/*.nix by the real nixpkgs lib (tests/nix/render-units.nix, with the
container's Nix), installed in /etc/systemd/system and started as a NixOS
machine would start them. The machine's "NixOS systems" are fake closures built
in the container's own store (tests/nix/fake-system.nix); each carries the agent
config file the module renders for it, which its switch links to
/etc/nixfleet/agent.json as NixOS's /etc activation does. The test process talks
to the control plane over 127.0.0.1 (the container shares the host's network)
with the real client and CLI. The box has a disk (container.Container.disk), so
the last test can reboot it for real and boot it again with its state.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nixfleet_test_container as container  # loaded by conftest
import nixfleet_test_units as units  # loaded by conftest
import pytest
import yaml

from nixfleet.client import Client
from nixfleet.errors import NixfleetError

pytestmark = [pytest.mark.system, pytest.mark.nix]

MID = "box"
ADMIN_KEY = "system-tier-admin-key-0123456789abcdef"
# Persistent paths (the box reboots in the last test): NixOS keeps job scripts in
# the store; secrets here live on the box's disk, not in a /run that a boot empties.
SCRIPTS = "/etc/nixfleet-unit-scripts"
KEYS = "/var/lib/nixfleet-keys"
RECORD = "/srv/share/switches.log"
AGENT = "nixfleet-agent.service"
CP = "nixfleet-control-plane.service"
# Upper bounds of `systemd-analyze security` exposure (docs/nixos-modules.md).
EXPOSURE_MAX = {AGENT: 2.5, CP: 1.5}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(what: str, predicate: Callable[[], Any], timeout: float = 90.0) -> Any:
    """Wait for a condition (a deadline against hangs, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass
class Box:
    """The booted container with the modules' units installed."""

    c: Any
    port: int
    share: Path
    rendered: dict[str, Any]
    lib: str
    salt: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> Client:
        return Client(self.url, ADMIN_KEY)

    def machine(self) -> dict[str, Any]:
        m: dict[str, Any] = self.client().get(f"/api/v1/machines/{MID}")
        return m

    def render(
        self,
        tags: list[str],
        *,
        port: int | None = None,
        script_dir: str = SCRIPTS,
        postgresql: bool = False,
    ) -> dict[str, Any]:
        """The modules evaluated for this machine with `tags`, inside the container
        (`postgresql`: the control plane's database.createLocally; `port`: another
        control plane's)."""
        config = machine_config(self.port if port is None else port, tags)
        if postgresql:
            config = config.replace(
                "settings.reconcile_interval = 1;", "database.createLocally = true;"
            )
        out: dict[str, Any] = units.render(
            "/nixpkgs-lib",
            config,
            packages=PACKAGES,
            script_dir=script_dir,
            instantiate=self.inner("nix-instantiate"),
            render_file="/src/tests/nix/render-units.nix",
        )
        return out

    def inner(self, *argv: str) -> list[str]:
        return ["nsenter", "-t", str(self.c.pid1), "-a", "env", "-i",
                f"PATH={container.INNER_PATH}", "HOME=/root", *argv]  # fmt: skip

    def system(self, name: str, tags: list[str], **args: Any) -> str:
        """Build a fake NixOS system in the container whose agent config has `tags`."""
        agent_json = self.c.path(self.render(tags)["etc"]["nixfleet/agent.json"]).read_text()
        argv = ["nix-build", "/src/tests/nix/fake-system.nix", "--no-out-link",
                "--argstr", "salt", f"{name}-{self.salt}", "--argstr", "agentConfig", agent_json,
                "--argstr", "record", RECORD]  # fmt: skip
        for key, value in args.items():
            argv += (
                ["--argstr", key, value]
                if isinstance(value, str)
                else ["--arg", key, json.dumps(value)]
            )
        out: str = self.c.run(*argv, timeout=300).stdout.strip().splitlines()[-1]
        return out

    def switches(self, path: str) -> list[str]:
        """The record lines ("begin|end action path cgroups") of switches to `path`."""
        f = self.share / "switches.log"
        text = f.read_text() if f.exists() else ""
        return [line for line in text.splitlines() if line.split()[2:3] == [path]]

    def main_pid(self, unit: str) -> int:
        out = self.c.run("systemctl", "show", "-P", "MainPID", unit).stdout
        return int(out.strip())


# What NixOS's stage 2 and boot activation do that the agent relies on: the booted
# generation is the system profile's, /run/booted-system and /run/current-system
# point at it, and its /etc (here: the agent's config) is linked. Not a module unit:
# the fake of the boot, as fake-system.nix is the fake of the switch.
BOOT = "fake-nixos-boot.service"
FAKE_BOOT_SCRIPT = """\
#!/bin/sh
set -eu
system=$(readlink -e /nix/var/nix/profiles/system)
ln -sfn "$system" /run/booted-system
ln -sfn "$system" /run/current-system
mkdir -p /etc/nixfleet
ln -sfn "$system/etc/nixfleet/agent.json" /etc/nixfleet/agent.json
"""
FAKE_BOOT = f"""\
[Unit]
Description=Fake NixOS stage 2: /run/booted-system, /run/current-system, /etc links
DefaultDependencies=no
After=local-fs.target
Before=sysinit.target
ConditionPathExists=/nix/var/nix/profiles/system

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart={SCRIPTS}/fake-nixos-boot

[Install]
WantedBy=sysinit.target
"""


PACKAGES = {
    "nixfleet": container.VENV,
    **{n: "/usr" for n in ("nix", "systemd", "coreutils", "findutils", "gnugrep", "gnused")},
}


def machine_config(port: int, tags: list[str]) -> str:
    """The NixOS configuration of the machine (agent and control plane on one box)."""
    tag_list = " ".join(json.dumps(t) for t in tags)
    return f"""{{
      networking.hostName = "{MID}";
      services.nixfleet-control-plane = {{
        enable = true;
        listen.port = {port};
        adminKeyFile = "{KEYS}/admin-key";
        settings.reconcile_interval = 1;
      }};
      services.nixfleet-agent = {{
        enable = true;
        controlPlaneUrl = "http://127.0.0.1:{port}";
        tags = [ {tag_list} ];
        tokenFile = "{KEYS}/token";
        pollInterval = 1;
        backoff = {{ initial = 1; max = 2; }};
      }};
    }}"""


@pytest.fixture(scope="module")
def box(
    system_root: Path, system_venv: Path, nix_conf: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Box]:
    lib = units.nixpkgs_lib()
    work = tmp_path_factory.mktemp("box")
    share = work / "share"
    share.mkdir()
    c = container.Container(
        root=system_root,
        log=work / "console.log",
        disk=work / "disk",
        binds=[(system_venv, container.VENV), (share, "/srv/share")],
        binds_ro=[(container.ROOT, "/src"), (lib, "/nixpkgs-lib"), (nix_conf, "/etc/nix/nix.conf")],
        hostname=MID,
    )
    c.boot()
    try:
        b = Box(c, free_port(), share, {}, lib, os.urandom(4).hex())
        b.rendered = b.render(["prod", "web"])
        for name, unit in b.rendered["units"].items():
            c.write(f"/etc/systemd/system/{name}", unit["text"])
            for script, text in unit["scripts"].items():
                c.write(f"{SCRIPTS}/{script}", text, 0o755)
        c.write(f"/etc/systemd/system/{BOOT}", FAKE_BOOT)
        c.write(f"{SCRIPTS}/fake-nixos-boot", FAKE_BOOT_SCRIPT, 0o755)
        c.run("systemctl", "enable", BOOT)
        c.write(f"{KEYS}/admin-key", ADMIN_KEY + "\n", 0o600)
        c.run("mkdir", "-p", "/var/log/journal")  # a journal that survives the reboot
        c.run("systemctl", "daemon-reload")
        c.run("journalctl", "--flush")
        yield b
    finally:
        for unit in (AGENT, CP):
            (work / f"{unit}.journal").write_text(c.journal(unit, 2000))
        c.stop()


@pytest.fixture(scope="module")
def running(box: Box) -> Box:
    """CP up, machine registered, first generation installed, agent started."""
    box.c.run("systemctl", "enable", "--now", CP)
    wait_for("the control plane to answer", lambda: _health(box.url))
    token = box.client().post("/api/v1/machines", {"id": MID, "issue_token": True})["token"]
    box.c.write(f"{KEYS}/token", token + "\n", 0o600)
    first = box.system("gen0", ["prod", "web"])
    # As if the machine had been installed with `first` and booted it.
    box.c.run("nix-env", "--profile", "/nix/var/nix/profiles/system", "--set", first)
    box.c.run("systemctl", "start", BOOT)
    box.c.run("systemctl", "enable", "--now", AGENT)
    return box


def _health(url: str, endpoint: str = "/health") -> bool:
    """Whether the control plane answers 200 on `endpoint` (/health, or /ready)."""
    import urllib.request

    try:
        with urllib.request.urlopen(url + endpoint, timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def reported(box: Box, generation: str, **expect: Any) -> Callable[[], dict[str, Any] | None]:
    def check() -> dict[str, Any] | None:
        m = box.machine()
        if m["current_generation"] != generation:
            return None
        if any(m.get(k) != v for k, v in expect.items()):
            return None
        return m

    return check


def agent_log(box: Box) -> str:
    text: str = box.c.journal(AGENT, 400)
    return text


# --- the units ----------------------------------------------------------------------


def test_rendered_units_verify_silently_inside(box: Box) -> None:
    done = box.c.run(
        "systemd-analyze", "verify", f"/etc/systemd/system/{AGENT}", f"/etc/systemd/system/{CP}",
        check=False,
    )  # fmt: skip
    assert (done.returncode, done.stderr + done.stdout) == (0, "")


def test_postgresql_variant_verifies_silently_inside(box: Box) -> None:
    """database.createLocally's unit (User=nixfleet, after/requires PostgreSQL) under
    the container's systemd, beside stand-ins for nixpkgs' postgresql units."""
    out = box.render(["prod"], postgresql=True)
    where = "/srv/verify-postgresql"
    box.c.write(f"{where}/{CP}", out["units"][CP]["text"])
    for name, text in units.POSTGRESQL_UNITS.items():
        box.c.write(f"{where}/{name}", text)
    assert "User=nixfleet" in out["units"][CP]["text"].splitlines()
    done = box.c.run("systemd-analyze", "verify", f"{where}/{CP}", check=False)
    assert (done.returncode, done.stderr + done.stdout) == (0, "")


# Around Debian's real postgresql.service (its server, enabled at boot), the units
# nixpkgs' services.postgresql adds and database.createLocally orders after:
# postgresql-setup.service runs ensureUsers/ensureDatabases (the role and database
# `nixfleet`, owned by it), postgresql.target is up once it has.
PG_SETUP = """\
[Unit]
Requires=postgresql.service
After=postgresql.service

[Service]
Type=oneshot
RemainAfterExit=true
User=postgres
ExecStart=/usr/bin/psql -v ON_ERROR_STOP=1 -d postgres -c "CREATE ROLE nixfleet LOGIN" \
  -c "CREATE DATABASE nixfleet OWNER nixfleet"
"""
PG_TARGET = """\
[Unit]
Requires=postgresql.service postgresql-setup.service
After=postgresql-setup.service
"""
PG_CP = "nixfleet-control-plane-postgresql.service"  # beside the SQLite one, own port


def _psql(box: Box, sql: str) -> list[str]:
    """Rows of `sql` in the database nixfleet, as the server's superuser (peer)."""
    out: str = box.c.run("runuser", "-u", "postgres", "--", "psql", "-Atd", "nixfleet",
                         "-v", "ON_ERROR_STOP=1", "-c", sql).stdout  # fmt: skip
    return out.split()


def test_control_plane_on_a_local_postgresql_by_peer_authentication(box: Box) -> None:
    """database.createLocally for real: the rendered unit, as the dynamic user
    `nixfleet`, reaches Debian's PostgreSQL over its socket by peer authentication (no
    password anywhere), after the role and database were made as nixpkgs makes them;
    what it writes is in that database."""
    port = free_port()
    scripts = "/etc/nixfleet-unit-scripts-postgresql"
    unit = box.render(["prod"], port=port, script_dir=scripts, postgresql=True)["units"][CP]
    assert "User=nixfleet" in unit["text"].splitlines()
    assert "passfile" not in unit["text"] and "pgpass" not in unit["text"]  # no password
    c = box.c
    c.write("/etc/systemd/system/postgresql-setup.service", PG_SETUP)
    c.write("/etc/systemd/system/postgresql.target", PG_TARGET)
    c.write(f"/etc/systemd/system/{PG_CP}", unit["text"])
    for script, text in unit["scripts"].items():
        c.write(f"{scripts}/{script}", text, 0o755)
    c.run("systemctl", "daemon-reload")
    try:
        c.run("systemctl", "start", PG_CP)  # pulls in the server and the setup (Requires)
        url = f"http://127.0.0.1:{port}"
        wait_for("the control plane on PostgreSQL to be ready", lambda: _health(url, "/ready"))
        client = Client(url, ADMIN_KEY)
        client.post("/api/v1/machines", {"id": "pg-box", "tags": ["prod"]})
        assert [m["id"] for m in client.get("/api/v1/machines")["machines"]] == ["pg-box"]
        assert _psql(box, "SELECT id FROM machines") == ["pg-box"]
        # Its connections: the role nixfleet, over the socket (no client address).
        sessions = _psql(
            box,
            "SELECT usename || '|' || (client_addr IS NULL) FROM pg_stat_activity "
            "WHERE datname = 'nixfleet' AND pid <> pg_backend_pid() AND backend_type = "
            "'client backend'",
        )
        assert sessions and set(sessions) == {"nixfleet|true"}, sessions
        # The role has no password: those sessions were let in by peer authentication.
        assert _psql(
            box, "SELECT rolpassword IS NULL FROM pg_authid WHERE rolname = 'nixfleet'"
        ) == ["t"]
    except BaseException:
        print(c.journal(PG_CP, 200), c.journal("postgresql-setup.service", 50), sep="\n")
        raise
    finally:
        c.run("systemctl", "stop", PG_CP, check=False)


def test_control_plane_runs_as_a_dynamic_user_with_its_credential(running: Box) -> None:
    c = running.c
    assert c.run("systemctl", "is-active", CP).stdout.strip() == "active"
    pid = running.main_pid(CP)
    uid = int(c.path(f"/proc/{pid}/status").read_text().split("\nUid:")[1].split()[0])
    assert uid != 0
    assert c.run("test", "-f", "/var/lib/private/nixfleet/nixfleet.db", check=False).returncode == 0
    # The key came in through LoadCredential: the admin client is accepted.
    assert running.client().get("/api/v1/machines")["machines"][0]["id"] == MID


def test_agent_reports_with_its_credential(running: Box) -> None:
    first = running.c.run("readlink", "/run/current-system").stdout.strip()
    m = wait_for("the first report", reported(running, first))
    assert set(m["tags"]) == {"prod", "web"}
    assert running.c.run("systemctl", "is-active", AGENT).stdout.strip() == "active"


def apply_rollout(box: Box, tmp_path: Path, name: str, store_path: str, **fields: Any) -> None:
    """A release of `store_path` for the box and a rollout of it, with the real CLI."""
    from nixfleet.flake import release_from_document, write_toml

    release = write_toml(
        release_from_document(
            {
                "flake_ref": "git+file:///srv/fleet",
                "flake_rev": os.urandom(20).hex(),
                "entries": [
                    {
                        "hostname": MID,
                        "store_path": store_path,
                        "platform": "x86_64-linux",
                        "tags": ["prod"],
                    }
                ],
            }
        ),
        tmp_path / "releases",
    )
    rollout = tmp_path / f"{name}.yaml"
    rollout.write_text(
        yaml.safe_dump(
            {
                "version": 1,
                "name": name,
                "release": str(release),
                "target": {"tags": ["prod"]},
                "strategy": "all-at-once",
                "health_timeout": "5m",
                **fields,
            }
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "nixfleet.cli", "rollout", "apply", "-f", str(rollout)],
        capture_output=True, text=True, env=cli_env(box), timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def cli_env(box: Box) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIXFLEET_")}
    env.update(NIXFLEET_CONTROL_PLANE_URL=box.url, NIXFLEET_API_KEY=ADMIN_KEY)
    return env


def test_rollout_switches_in_a_transient_unit(running: Box, tmp_path: Path) -> None:
    new = running.system("gen1", ["prod", "web"])
    apply_rollout(running, tmp_path, "system-tier", new)
    wait_for(
        "the agent to deploy the rollout's generation",
        reported(running, new, last_success=True, last_message=f"deployed {new}"),
    )
    begin, end = running.switches(new)
    assert begin.startswith("begin switch") and end.startswith("end switch")
    # The switch ran in its own transient unit, not in the agent's (sandboxed) cgroup.
    assert re.search(r"/nixfleet-switch-[0-9]+-[0-9]+\.service", begin), begin
    assert "nixfleet-agent.service" not in begin


def test_agent_restarted_mid_switch_concludes_and_reports(running: Box) -> None:
    slow = running.system("gen2-slow", ["prod", "web"], delay=8)
    running.client().request(
        "PUT", f"/api/v1/machines/{MID}/desired-generation", {"store_path": slow, "cache_url": None}
    )
    wait_for("the slow switch to begin", lambda: running.switches(slow))
    before = running.main_pid(AGENT)
    running.c.run("systemctl", "restart", AGENT)
    assert running.main_pid(AGENT) != before
    wait_for(
        "the restarted agent to conclude the switch",
        reported(running, slow, last_success=True, last_message=f"deployed {slow}"),
    )
    lines = running.switches(slow)
    assert [ln.split()[0] for ln in lines] == ["begin", "end"], lines
    assert "found unfinished activation" in agent_log(running)


def test_a_switch_that_changes_the_tags_shows_in_the_next_report(running: Box) -> None:
    """The acceptance case of issue 15: tags [prod web] -> [prod api], no agent restart."""
    assert set(running.machine()["tags"]) == {"prod", "web"}
    api = running.system("gen3-api", ["prod", "api"])
    pid = running.main_pid(AGENT)
    running.client().request(
        "PUT", f"/api/v1/machines/{MID}/desired-generation", {"store_path": api, "cache_url": None}
    )
    m = wait_for("the switch to the api generation", reported(running, api, last_success=True))
    assert set(m["tags"]) == {"prod", "api"}
    assert running.main_pid(AGENT) == pid, "the switch must not restart the agent"
    out = subprocess.run(
        [sys.executable, "-m", "nixfleet.cli", "machines", "list", "--tags", "api", "--json"],
        capture_output=True, text=True, timeout=60, check=False, env=cli_env(running),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert MID in out.stdout


def test_a_failing_switch_rolls_back_and_is_never_retried(running: Box) -> None:
    previous = running.machine()["current_generation"]
    bad = running.system("gen4-fails", ["prod", "api"], fail=True)
    running.client().request(
        "PUT", f"/api/v1/machines/{MID}/desired-generation", {"store_path": bad, "cache_url": None}
    )
    m = wait_for("the rollback report", reported(running, previous, last_success=False))
    assert m["current_generation"] == previous
    assert m["last_message"].startswith("rolled back:"), m["last_message"]
    # Several more polls (a poll a second): none may try the failed generation again.
    seen = {m["last_report_at"]}

    def more_reports() -> bool:
        seen.add(running.machine()["last_report_at"])
        return len(seen) > 5

    wait_for("five more reports", more_reports)
    assert [ln.split()[0] for ln in running.switches(bad)] == ["begin", "end"]
    assert running.c.run("readlink", "/run/current-system").stdout.strip() == previous
    assert running.machine()["last_success"] is False


def test_security_exposure_is_within_bounds_and_recorded(running: Box) -> None:
    docs = (container.ROOT / "docs" / "nixos-modules.md").read_text()
    for unit, bound in EXPOSURE_MAX.items():
        out = running.c.run("systemd-analyze", "security", "--no-pager", unit).stdout
        level = float(re.findall(r"Overall exposure level for \S+: ([0-9.]+)", out)[0])
        assert level <= bound, f"{unit}: exposure {level} > {bound}\n{out}"
        assert f"| `{unit}` | {level} |" in docs, f"record {unit}'s exposure {level} in the docs"


# --- a reboot (issue 18): last, it reboots the box ----------------------------------


def reported_after_boot(box: Box, generation: str) -> Callable[[], dict[str, Any] | None]:
    """The report of `generation` as the booted one (the CP itself may be booting)."""
    check = reported(box, generation, last_success=True, needs_reboot=False)

    def after_boot() -> dict[str, Any] | None:
        try:
            m = check()
        except NixfleetError:  # unreachable, or not ready yet
            return None
        return m if m is not None and m.get("booted_generation") == generation else None

    return after_boot


def wait_for_reboot(box: Box, timeout: float = 120.0) -> None:
    """Wait for the container's systemd to reboot it (nspawn then exits REBOOTED),
    failing early with the agent's log when the agent could not reboot it, and with
    the console when the box ended otherwise."""
    assert box.c.proc is not None
    deadline = time.monotonic() + timeout
    log = ""
    while box.c.proc.poll() is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"the box did not reboot:\n{agent_log(box)}")
        log = box.c.journal(AGENT, 50) or log  # kept: once the box is gone it cannot be read
        if "reboot command failed" in log:
            raise AssertionError(f"the agent could not reboot the box:\n{agent_log(box)}")
        time.sleep(1)
    code = box.c.wait_exit(10)
    assert code == container.REBOOTED, (
        f"the box ended with {code}, not {container.REBOOTED} (a reboot).\n"
        f"console:\n{box.c.console()}\nthe agent's last log:\n{log}"
    )


def test_a_kernel_change_reboots_under_a_lease_and_reports_the_booted_generation(
    running: Box, tmp_path: Path
) -> None:
    """`reboot: when-needed` and a generation with another kernel: the agent switches,
    takes the reboot lease and runs its reboot command (`systemctl reboot`, the real
    one, inside the container); systemd reboots the box, which systemd-nspawn shows by
    ending with 133; the test boots it again on the same disk, as the machine's
    firmware would. The agent comes back on the new generation, reports it as booted,
    and gives the lease back once healthy; the rollout completes."""
    c = running.c
    booted = c.run("readlink", "/run/booted-system").stdout.strip()
    new = running.system("gen5-kernel", ["prod", "api"], kernel="k2")
    apply_rollout(running, tmp_path, "kernel", new, reboot="when-needed")
    wait_for_reboot(running)
    c.boot()
    m = wait_for("the report of the booted generation", reported_after_boot(running, new))
    assert m["booted_generation"] != booted
    assert c.run("readlink", "/run/booted-system").stdout.strip() == new
    log = running.c.journal(AGENT, 2000)  # both boots: the journal is on the disk
    assert f"reboot lease taken; rebooting into {new}" in log, log
    wait_for("the lease to be given back", lambda: "reboot lease released" in agent_log(running))
    rollout = wait_for(
        "the rollout to complete",
        lambda: (
            (r := running.client().get("/api/v1/rollouts/kernel"))["status"] == "completed" and r
        ),
    )
    events = [(e["kind"], e["machine"]) for e in rollout["events"]]
    assert events.index(("machine-rebooting", MID)) < events.index(("machine-rebooted", MID))
