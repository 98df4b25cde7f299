"""`nixfleet demo`: a whole fleet on this machine, on real Nix, with nothing mocked.

An embedded control plane on a SQLite file (or, with --database-url, several
control-plane replicas on one PostgreSQL database), a signed binary cache served on
127.0.0.1, and one real agent process per simulated machine (each with its own
system profile, current-system link and state directory). The flake is a tiny
one whose "NixOS systems" are fake closures that build offline in milliseconds;
everything else is exactly what an operator runs: `release create`, `rollout
apply`, `status`.
"""

from __future__ import annotations

import functools
import json
import platform
import shutil
import socket
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen

from nixfleet import nix, process, wire
from nixfleet.client import Client
from nixfleet.errors import CommandError, NixfleetError

FLAKE = """\
{
  description = "nixfleet demo fleet: fake NixOS systems that build offline";
  outputs = { self }:
    let
      release = import ./release.nix;
      system = "%(system)s";
      # A stand-in for config.system.build.toplevel: bin/switch-to-configuration points
      # the machine's current-system link at itself, as NixOS's activation does.
      toplevel = host: builtins.derivation {
        name = "nixos-system-${host}-${release.version}";
        inherit system;
        builder = "/bin/sh";
        PATH = "/usr/bin:/bin";
        broken = if release.broken then "1" else "";
        args = [ "-c" ''
          mkdir -p $out/bin
          echo ${release.version} > $out/nixos-version
          cat > $out/bin/switch-to-configuration <<EOS
          #!/bin/sh
          if [ -n "$broken" ]; then
            echo "error: unit demo-app.service failed to start" >&2
            exit 4
          fi
          ln -sfn $out "\\$NIXFLEET_CURRENT_SYSTEM"
          EOS
          sed -i 's/^          //' $out/bin/switch-to-configuration
          chmod +x $out/bin/switch-to-configuration
        '' ];
      };
      host = name: tags: {
        config = {
          system.build.toplevel = toplevel name;
          services.nixfleet-agent.tags = tags;
          nixpkgs.hostPlatform.system = system;
        };
      };
    in {
      nixosConfigurations = {
%(hosts)s
      };
    };
}
"""

ROLLOUT = """\
version: 1
name: %(name)s
release: %(release)s
target:
  tags: [demo]
strategy: canary
batches: [1, "50%%", "100%%"]
failure_threshold: 0
on_failure: pause
health_timeout: 60s
soak: 2s
"""


def nix_system() -> str:
    machine = platform.machine().lower()
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    return f"{arch}-linux"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def require_nix() -> None:
    missing = [
        c for c in ("nix", "nix-build", "nix-env", "nix-store", "git") if not shutil.which(c)
    ]
    if missing:
        raise NixfleetError(
            f"the demo needs {', '.join(missing)} on PATH. Install Nix (Debian/Ubuntu: "
            "`sudo apt-get install nix-bin git`; elsewhere https://nixos.org/download) "
            "and run `nixfleet demo` again"
        )


@dataclass
class Demo:
    """One demo fleet rooted at a directory; every process it starts is tracked."""

    root: Path
    hosts: list[str]
    env: dict[str, str]
    say: Callable[[str], None]
    show: Callable[[str], None]
    procs: list[Popen[bytes]] = field(default_factory=list)
    database_url: str | None = None  # None: the SQLite file nixfleet.db in root
    replicas: int = 1
    cp_urls: list[str] = field(default_factory=list)
    cache_url: str = ""
    admin_key: str = ""

    @property
    def cp_url(self) -> str:
        """The replica the operator's CLI talks to."""
        return self.cp_urls[0]

    @property
    def flake(self) -> Path:
        return self.root / "fleet"

    def machine_dir(self, host: str) -> Path:
        return self.root / "machines" / host

    # --- setting up ---------------------------------------------------------------

    def write_flake(self, version: str, broken: bool) -> None:
        self.flake.mkdir(parents=True, exist_ok=True)
        hosts = "\n".join(
            f'        {h} = host "{h}" [ "demo" "{"canary" if i == 0 else "web"}" ];'
            for i, h in enumerate(self.hosts)
        )
        (self.flake / "flake.nix").write_text(FLAKE % {"system": nix_system(), "hosts": hosts})
        (self.flake / "release.nix").write_text(
            f'{{ version = "{version}"; broken = {"true" if broken else "false"}; }}\n'
        )
        git: list[str | Path] = [
            "git",
            "-C",
            self.flake,
            "-c",
            "user.name=demo",
            "-c",
            "user.email=demo@localhost",
        ]
        if not (self.flake / ".git").exists():
            process.run([*git, "init", "-q"], timeout=30)
        process.run([*git, "add", "-A"], timeout=30)
        process.run([*git, "commit", "-q", "-m", f"release {version}"], timeout=30)

    def start_cache(self) -> str:
        cache = self.root / "cache"
        cache.mkdir(exist_ok=True)
        process.run(
            [
                "nix-store",
                "--generate-binary-cache-key",
                "nixfleet-demo-1",
                self.root / "cache.sk",
                self.root / "cache.pk",
            ],
            timeout=30,
        )
        port = free_port()
        self.procs.append(
            process.spawn(
                [
                    sys.executable,
                    "-m",
                    "http.server",
                    "--bind",
                    "127.0.0.1",
                    "--directory",
                    cache,
                    str(port),
                ],
                log_file=self.root / "cache.log",
                env=self.env,
                detach=True,
            )
        )
        self.cache_url = f"http://127.0.0.1:{port}"
        return (self.root / "cache.pk").read_text().strip()

    def start_control_plane(self) -> None:
        """`replicas` control planes on one database; one of them leads (DESIGN §13)."""
        settings = self.root / "control-plane.json"
        settings.write_text(json.dumps({"reconcile_interval": 0.5, "stale_after": 30}))
        database: list[str | Path] = (
            ["--database-url", self.database_url]
            if self.database_url
            else ["--db", self.root / "nixfleet.db"]
        )
        base: list[str | Path] = [
            sys.executable,
            "-m",
            "nixfleet.controlplane.main",
            *database,
            "--config",
            settings,
        ]
        self.admin_key = process.run(
            [*base, "keys", "create", "--role", "admin", "--name", "demo"], env=self.env, timeout=60
        ).stdout.strip()
        (self.root / "admin.key").write_text(self.admin_key + "\n")
        (self.root / "admin.key").chmod(0o600)
        for i in range(self.replicas):
            port = free_port()
            log = "control-plane.log" if i == 0 else f"control-plane-{i + 1}.log"
            self.procs.append(
                process.spawn(
                    [*base, "--listen", f"127.0.0.1:{port}"],
                    log_file=self.root / log,
                    env=self.env,
                    detach=True,
                )
            )
            self.cp_urls.append(f"http://127.0.0.1:{port}")
        self.env["NIXFLEET_CONTROL_PLANE_URL"] = self.cp_url
        self.env["NIXFLEET_API_KEY_FILE"] = str(self.root / "admin.key")
        self.env.pop("NIXFLEET_API_KEY", None)
        for url in self.cp_urls:
            wait_for(functools.partial(_healthy, url), 30, f"{url} to answer /health")

    def nixfleet(self, *args: str, quiet: bool = False) -> str:
        """Run the real CLI as an operator would, echoing the command and its output."""
        self.say(f"$ nixfleet {' '.join(args)}")
        done = process.run(
            [sys.executable, "-m", "nixfleet.cli", *args], env=self.env, timeout=300, check=False
        )
        if not quiet and done.stdout.strip():
            self.show(done.stdout.rstrip())
        if done.stderr.strip():
            self.say(done.stderr.rstrip())
        if done.returncode != 0:
            raise CommandError(f"`nixfleet {' '.join(args)}` exited {done.returncode}")
        return done.stdout

    def release(self, version: str, broken: bool = False) -> wire.Release:
        self.write_flake(version, broken)
        push = f"file://{self.root / 'cache'}?secret-key={self.root / 'cache.sk'}"
        out = self.nixfleet(
            "release",
            "create",
            "--flake",
            str(self.flake),
            "--out",
            str(self.root / "releases"),
            "--push-to",
            push,
            "--cache-url",
            self.cache_url,
            "--json",
            quiet=True,
        )
        rel: wire.Release = json.loads(out)
        self.say(f"  release {rel['id']}: {len(rel['entries'])} hosts, pushed to the signed cache")
        return rel

    def install(self, rel: wire.Release) -> None:
        """Give each machine its first generation, as the installer would have."""
        for entry in rel["entries"]:
            d = self.machine_dir(entry["hostname"])
            (d / "profiles").mkdir(parents=True, exist_ok=True)
            nix.profile_set(d / "profiles" / "system", entry["store_path"], env=self.env)
            link = d / "current-system"
            link.unlink(missing_ok=True)
            link.symlink_to(entry["store_path"])

    def forget(self, rel: wire.Release) -> None:
        """Drop a release's closures from the local store, so agents must fetch them."""
        paths = [e["store_path"] for e in rel["entries"]]
        process.run(["nix-store", "--delete", *paths], env=self.env, timeout=120, check=False)

    def start_agents(self, public_key: str) -> None:
        client = Client(self.cp_url, self.admin_key)
        for i, host in enumerate(self.hosts):
            d = self.machine_dir(host)
            token = client.register_machine(host, issue_token=True).get("token", "")
            (d / "state").mkdir(parents=True, exist_ok=True)
            (d / "token").write_text(token + "\n")
            (d / "token").chmod(0o600)
            config = {
                # Agents spread over the replicas, as behind a load balancer.
                "control_plane_url": self.cp_urls[i % len(self.cp_urls)],
                "machine_id": host,
                "token_file": str(d / "token"),
                # What services.nixfleet-agent.tags says in the flake: baked into the
                # system, reported on every poll.
                "tags": ["demo", "canary" if i == 0 else "web"],
                "poll_interval": 2,
                "trusted_public_keys": [public_key],
                "profile": str(d / "profiles" / "system"),
                "current_system": str(d / "current-system"),
                "state_dir": str(d / "state"),
                "use_systemd_run": False,
            }
            (d / "agent.json").write_text(json.dumps(config, indent=2))
            self.procs.append(
                process.spawn(
                    [sys.executable, "-m", "nixfleet.agent.main", "--config", d / "agent.json"],
                    log_file=d / "agent.log",
                    env=self.env,
                    detach=True,
                )
            )
        client.close()
        wait_for(
            lambda: all(m["last_report_at"] for m in self._machines()), 60, "every agent to report"
        )

    def _machines(self) -> list[wire.Machine]:
        with Client(self.cp_url, self.admin_key) as c:
            return c.machines()["machines"]

    # --- rollouts -----------------------------------------------------------------

    def rollout(self, name: str, release_id: str, until: set[str], timeout: float = 180) -> str:
        path = self.root / "rollouts" / f"{name}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(ROLLOUT % {"name": name, "release": release_id})
        self.nixfleet("rollout", "apply", "-f", str(path))
        return self.watch(name, until, timeout)

    def watch(self, name: str, until: set[str], timeout: float) -> str:
        """Print rollout events as they happen until the rollout reaches a state in until."""
        seen = 0
        deadline = time.monotonic() + timeout
        with Client(self.cp_url, self.admin_key) as c:
            while True:
                r = c.rollout(name)
                for event in r["events"][seen:]:
                    self.say("  " + describe(event))
                seen = len(r["events"])
                if r["status"] in until:
                    return str(r["status"])
                if time.monotonic() > deadline:
                    raise NixfleetError(
                        f"rollout {name} still {r['status']} after {timeout:g}s; "
                        f"see {self.root}/machines/*/agent.log and control-plane.log"
                    )
                time.sleep(0.5)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except Exception:
                proc.kill()
        self.procs.clear()


def describe(event: wire.RolloutEvent) -> str:
    detail = event.get("detail") or {}
    parts = [event["kind"]]
    batch, machine = event.get("batch"), event.get("machine")
    if batch is not None:
        parts.append(f"batch {batch + 1}")
    if machine:
        parts.append(machine)
    extra = detail.get("reason") or detail.get("message") or detail.get("hosts")
    if extra:
        parts.append(str(extra) if not isinstance(extra, list) else ", ".join(map(str, extra)))
    return ": ".join([parts[0], " ".join(parts[1:])]) if len(parts) > 1 else parts[0]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=1) as r:  # noqa: S310 (http only)
            return bool(r.status == 200)
    except OSError:
        return False


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise NixfleetError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.2)


def run(
    root: Path | None,
    machines: int,
    keep: bool,
    env: dict[str, str],
    say: Callable[[str], None],
    show: Callable[[str], None],
    database_url: str | None = None,
    replicas: int = 1,
) -> Path:
    """The whole demo; returns its directory (left in place with keep or on failure)."""
    require_nix()
    made = root is None
    root = Path(tempfile.mkdtemp(prefix="nixfleet-demo-")) if root is None else root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    hosts = [f"web-{i:02d}" for i in range(1, machines + 1)]
    demo = Demo(root, hosts, env, say, show, database_url=database_url, replicas=replicas)
    ok = False
    try:
        if database_url:
            say(f"[1/6] {replicas} control planes on PostgreSQL: {database_url}")
        else:
            say(f"[1/6] control plane on an embedded SQLite file: {root / 'nixfleet.db'}")
        demo.start_control_plane()
        say(f"      listening on {', '.join(demo.cp_urls)}")
        public_key = demo.start_cache()
        say(
            f"[2/6] signed binary cache served on {demo.cache_url} (key {public_key.split(':')[0]})"
        )
        say(f"[3/6] release v1 from the demo flake, installed on {machines} machines; agents start")
        v1 = demo.release("v1")
        demo.install(v1)
        demo.start_agents(public_key)
        demo.nixfleet("status")
        say("[4/6] release v2, rolled out canary first: 1 machine, then 50%, then the rest")
        v2 = demo.release("v2")
        demo.forget(v2)  # the agents fetch it from the signed cache, not the local store
        status = demo.rollout("demo-v2", v2["id"], {"completed", "paused", "failed"})
        if status != "completed":
            raise NixfleetError(f"rollout demo-v2 ended {status}, expected completed")
        demo.nixfleet("status")
        say("[5/6] release v3 has a broken switch: the canary catches it")
        v3 = demo.release("v3", broken=True)
        demo.forget(v3)
        status = demo.rollout("demo-v3", v3["id"], {"paused", "failed", "completed"})
        if status != "paused":
            raise NixfleetError(f"rollout demo-v3 ended {status}; the canary should have paused it")
        say("      the canary rolled back to v2 on its own; the rest of the fleet never saw v3")
        demo.nixfleet("rollout", "status", "demo-v3")
        say("[6/6] the fleet now")
        demo.nixfleet("status")
        ok = True
    finally:
        if keep and ok:
            (root / "pids").write_text("".join(f"{p.pid}\n" for p in demo.procs))
            say(
                "\nThe demo fleet keeps running. Explore it with:\n"
                f"  export NIXFLEET_CONTROL_PLANE_URL={demo.cp_url}\n"
                f"  export NIXFLEET_API_KEY_FILE={root / 'admin.key'}\n"
                "  nixfleet status\n"
                "  nixfleet rollout status demo-v3\n"
                "  nixfleet rollout resume demo-v3      # (it will fail again: v3 is broken)\n"
                f"Dashboard: {demo.cp_url}/ui/ (log in with the key in {root / 'admin.key'})\n"
                f"Logs: {root}/control-plane.log, {root}/machines/*/agent.log\n"
                f"Stop it: kill $(cat {root / 'pids'})"
            )
        else:
            demo.stop()
            if ok and made:
                shutil.rmtree(root, ignore_errors=True)
            elif not ok:
                say(f"demo failed; its logs are in {root}")
    return root
