"""systemd-nspawn containers on a cached Debian root: systemd as PID 1, or one command.

The root file system is built once by make-rootfs.sh (debootstrap from this
machine's apt mirror) and never written to: every container mounts it as an
overlay with a tmpfs on top (`--volatile=overlay`), so each boot starts clean and
gets its own Nix store (the container release's nix-bin). The Python environment for the
project (its dependencies from PyPI, inside the container) is cached beside it;
each session copies it and installs the wheel built from the working tree.

Capabilities are checked up front: without root or systemd-nspawn the tier skips
with the reason on a developer's machine and fails under CI (NIXFLEET_CI=1).
Once the tools are there, a container that does not boot is always a failure.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CACHE = Path(os.environ.get("NIXFLEET_ROOTFS_CACHE", "/var/cache/nixfleet-tests"))
# Debian release -> the other one, whose nix-bin (2.8 or 2.26) the container brings.
OTHER_RELEASE = {"bookworm": "trixie", "trixie": "bookworm"}
SUITE_VAR = "NIXFLEET_ROOTFS_SUITE"  # forces the container's release (docs/system-tests.md)
INNER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
VENV = "/opt/nixfleet"  # where the project is installed inside containers
NIX_CONF = "sandbox = false\nsubstituters =\nexperimental-features = nix-command flakes\n"
BOOT_TIMEOUT = 90.0
# The host's trust store, which may hold a proxy's CA the Debian root lacks.
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def host_release() -> str:
    """This machine's Debian codename (VERSION_CODENAME), "" when it has none."""
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return ""
    found = re.search(r"^VERSION_CODENAME=(\S+)$", text, re.MULTILINE)
    return found.group(1).strip('"') if found else ""


def container_suite() -> str:
    """The Debian release of the tier's containers: the other one than this machine's
    (Debian 12 -> 13, 13 -> 12, anything else -> 13), or NIXFLEET_ROOTFS_SUITE."""
    forced = os.environ.get(SUITE_VAR, "").strip()
    if forced:
        if not re.fullmatch(r"[a-z][a-z0-9-]*", forced):
            pytest.fail(f"{SUITE_VAR}={forced!r} is not a Debian suite name (bookworm, trixie)")
        return forced
    return OTHER_RELEASE.get(host_release(), "trixie")


def require_capabilities() -> None:
    """Skip (developer) or fail (CI) with what is missing and how to get it."""
    problems = []
    if os.geteuid() != 0:
        problems.append("it needs root (debootstrap, systemd-nspawn, nsenter)")
    for tool, package in (
        ("systemd-nspawn", "systemd-container"),
        ("debootstrap", "debootstrap"),
        ("nsenter", "util-linux"),
    ):
        if shutil.which(tool) is None:
            problems.append(f"{tool} is missing (apt-get install {package})")
    if not problems:
        return
    message = "the system tier cannot run here: " + "; ".join(problems)
    if os.environ.get("NIXFLEET_CI") == "1":
        pytest.fail(message + " — under CI (NIXFLEET_CI=1) this is an error, not a skip")
    pytest.skip(message + " (docs/system-tests.md)")


def _run(argv: Sequence[str], timeout: float, what: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        pytest.fail(
            f"{what} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        )
    return done


def prebuild(suite: str, log: Path) -> subprocess.Popen[bytes] | None:
    """Start building the root in the background (None when it cannot be built here).

    The suite's other tests run meanwhile, so a fresh CI machine does not wait the
    2 to 4 minutes of debootstrap on the tier's critical path; rootfs() then finds the
    root built, or waits on make-rootfs.sh's lock for the build to finish."""
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        return None
    with log.open("ab") as out:
        return subprocess.Popen(
            [str(HERE / "make-rootfs.sh"), suite],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
        )  # fmt: skip


def rootfs(suite: str) -> Path:
    """The cached Debian root of `suite` (built on first use: ~1.5 minutes)."""
    done = _run(
        [str(HERE / "make-rootfs.sh"), suite], 1200, f"building the {suite} root (make-rootfs.sh)"
    )
    return Path(done.stdout.strip().splitlines()[-1])


def _nspawn_base(root: Path, *, volatile: bool = True) -> list[str]:
    return [
        "systemd-nspawn",
        "--quiet",
        "--register=no",
        "--keep-unit",
        *(["--volatile=overlay"] if volatile else []),
        "-D",
        str(root),
    ]


# systemd-nspawn's exit status when the container's systemd rebooted (the
# systemd-nspawn@.service unit restarts on it: RestartForceExitStatus=133).
REBOOTED = 133


def run_once(
    root: Path,
    argv: Sequence[str],
    *,
    binds: Sequence[tuple[Path | str, str]] = (),
    binds_ro: Sequence[tuple[Path | str, str]] = (),
    overlays: Sequence[tuple[Path | str, str]] = (),
    env: dict[str, str] | None = None,
    timeout: float = 600,
    private_network: bool = False,
) -> subprocess.CompletedProcess[str]:
    """One command in a throw-away container (no init): for builds and the second Nix run.

    `overlays` mount a host directory read-only with a temporary writable layer.
    `private_network`: its own network namespace (loopback only), where it may
    create namespaces and veth pairs of its own (CAP_NET_ADMIN there)."""
    flags = ["--private-network"] if private_network else []
    flags += [f"--bind={src}:{dst}" for src, dst in binds]
    flags += [f"--bind-ro={src}:{dst}" for src, dst in binds_ro]
    flags += [f"--overlay={src}::{dst}" for src, dst in overlays]
    flags += [f"--setenv={k}={v}" for k, v in {"PATH": INNER_PATH, **(env or {})}.items()]
    return subprocess.run(
        [*_nspawn_base(root), "--pipe", *flags, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def _dependencies() -> list[str]:
    """The project's dependencies and what its tests import (the PostgreSQL extra
    too: a test module that cannot import psycopg fails collection under CI)."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = meta.get("optional-dependencies", {}).get("postgresql", [])
    return [*meta["dependencies"], *extras, "pytest", "hypothesis", "setuptools", "wheel"]


def python_env(root: Path) -> Path:
    """A venv at VENV with the project's dependencies (pip inside the container), cached."""
    deps = _dependencies()
    key = hashlib.sha256(
        "\n".join([root.name, (ROOT / "constraints.txt").read_text(), *deps]).encode()
    ).hexdigest()[:16]
    venv = CACHE / f"venv-{root.name}-{key}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / f".lock-{venv.name}").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # checkouts testing at once share the cache
        if not (venv / ".complete").exists():
            _build_env(root, venv, deps)
    return venv


def _build_env(root: Path, venv: Path, deps: list[str]) -> None:
    tmp = CACHE / f".venv-build-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ro: list[tuple[Path | str, str]] = [(ROOT, "/src")]
    cert = ""
    if Path(CA_BUNDLE).exists():
        ro.append((CA_BUNDLE, "/host-ca.crt"))
        cert = "--cert /host-ca.crt "
    script = (
        f"python3 -m venv {VENV} && {VENV}/bin/pip install -q --disable-pip-version-check "
        f"{cert}-c /src/constraints.txt " + " ".join(f"'{d}'" for d in deps)
    )
    done = run_once(root, ["sh", "-c", script], binds=[(tmp, VENV)], binds_ro=ro)
    if done.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.fail(f"installing the dependencies inside the container failed:\n{done.stderr}")
    (tmp / ".complete").touch()
    shutil.rmtree(venv, ignore_errors=True)
    tmp.rename(venv)


def session_env(root: Path, workdir: Path) -> Path:
    """A private copy of the cached venv with this tree's wheel, built and installed
    inside the container (pip wheel on a throw-away overlay of the tree)."""
    venv = workdir / "venv"
    if not (venv / "bin" / "nixfleet-agent").exists():
        shutil.rmtree(venv, ignore_errors=True)
        shutil.copytree(python_env(root), venv, symlinks=True)
        pip = f"{VENV}/bin/pip"
        script = (
            f"{pip} wheel -q --no-deps --no-build-isolation --disable-pip-version-check "
            f"-w /tmp/wheel /src && {pip} install -q --no-deps --no-index "
            "--disable-pip-version-check /tmp/wheel/nixfleet-*.whl"
        )
        done = run_once(root, ["sh", "-c", script], binds=[(venv, VENV)], overlays=[(ROOT, "/src")])
        if done.returncode != 0:
            pytest.fail(
                f"building and installing the wheel inside the container failed:\n{done.stderr}"
            )
    return venv


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def _inner_init(nspawn: int) -> int | None:
    """The container's PID 1: the descendant of nspawn that is 1 in its namespace."""
    todo = [nspawn]
    while todo:
        pid = todo.pop()
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        nspid = next((ln.split()[1:] for ln in status.splitlines() if ln.startswith("NSpid:")), [])
        if pid != nspawn and len(nspid) > 1 and nspid[-1] == "1":
            return pid
        todo += _children(pid)
    return None


@dataclass
class Container:
    """A booted container: systemd as PID 1 on the cached root.

    By default its writes go to a tmpfs (`--volatile=overlay`) and vanish with it.
    With `disk` (a host directory), they go to an overlay upper layer there instead,
    mounted by us over the cached root: the container keeps its /etc, /var and Nix
    store across boots, so it can reboot (nspawn exits REBOOTED) and boot() again on
    the same disk, as a machine does."""

    root: Path
    log: Path
    binds: list[tuple[Path | str, str]] = field(default_factory=list)
    binds_ro: list[tuple[Path | str, str]] = field(default_factory=list)
    hostname: str = "nixfleet-box"
    disk: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    pid1: int = 0
    boots: int = 0

    def _mount_disk(self) -> Path:
        assert self.disk is not None
        merged = self.disk / "merged"
        if os.path.ismount(merged):
            return merged
        for d in ("upper", "work", "merged"):
            (self.disk / d).mkdir(parents=True, exist_ok=True)
        options = (
            f"lowerdir={self.root},upperdir={self.disk / 'upper'},workdir={self.disk / 'work'}"
        )
        _run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)], 30,
             "mounting the container's disk (overlayfs)")  # fmt: skip
        return merged

    def boot(self) -> None:
        flags = [f"--bind={src}:{dst}" for src, dst in self.binds]
        flags += [f"--bind-ro={src}:{dst}" for src, dst in self.binds_ro]
        base = (
            _nspawn_base(self._mount_disk(), volatile=False)
            if self.disk is not None
            else _nspawn_base(self.root)
        )
        self.boots += 1
        logf = self.log.open("ab")
        logf.write(f"\n--- boot {self.boots} ---\n".encode())
        logf.flush()
        self.proc = subprocess.Popen(
            [
                *base,
                "-b",
                "--console=pipe",
                f"--hostname={self.hostname}",
                *flags,
            ],
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
        )
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"systemd-nspawn exited {self.proc.returncode}:\n{self.console()}")
            pid = _inner_init(self.proc.pid)
            if pid is not None and Path(f"/proc/{pid}/root/run/systemd/system").exists():
                self.pid1 = pid
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"the container's systemd did not start:\n{self.console()}")
        while True:  # PID 1's bus socket appears a moment after /run/systemd/system
            state = self.run(
                "timeout", str(int(BOOT_TIMEOUT)), "systemctl", "is-system-running", "--wait",
                check=False,
            )  # fmt: skip
            if state.stdout.strip() or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if state.stdout.strip() not in ("running", "degraded"):
            failed = self.run("systemctl", "--failed", "--no-legend", check=False).stdout
            pytest.fail(
                f"systemd in the container is {state.stdout.strip() or 'not answering'}"
                f" ({state.stderr.strip()}); failed units:\n{failed}\n{self.console()}"
            )

    def console(self) -> str:
        return self.log.read_text(errors="replace")[-6000:] if self.log.exists() else ""

    def run(
        self, *argv: str, check: bool = True, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """A command inside (all namespaces of PID 1), with a clean environment."""
        assert self.pid1, "not booted"
        done = subprocess.run(
            ["nsenter", "-t", str(self.pid1), "-a", "env", "-i", f"PATH={INNER_PATH}",
             "HOME=/root", "LANG=C.UTF-8", *argv],
            capture_output=True, text=True, timeout=timeout, check=False, input=input,
        )  # fmt: skip
        if check and done.returncode != 0:
            raise AssertionError(
                f"in the container: {' '.join(argv)} exited {done.returncode}\n"
                f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
            )
        return done

    def path(self, inner: str) -> Path:
        """Where a path inside the container is, seen from the host."""
        return Path(f"/proc/{self.pid1}/root") / inner.lstrip("/")

    def write(self, inner: str, text: str, mode: int = 0o644) -> None:
        target = self.path(inner)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)

    def journal(self, unit: str, lines: int = 200) -> str:
        return self.run(
            "journalctl", "-u", unit, "-n", str(lines), "--no-pager", "-o", "cat", check=False
        ).stdout

    def wait_exit(self, timeout: float) -> int:
        """Wait for the container to end by itself (a reboot or poweroff inside)."""
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the container did not end within {timeout:.0f} s:\n{self.console()}"
            ) from None
        self.proc, self.pid1 = None, 0
        return code

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.run("systemctl", "poweroff", "--no-block", check=False, timeout=30)
                try:
                    self.proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None
        if self.disk is not None and os.path.ismount(self.disk / "merged"):
            subprocess.run(["umount", str(self.disk / "merged")], check=False, timeout=60)
