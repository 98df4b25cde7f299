"""Real-Nix test helpers: fake NixOS systems, signed binary caches served over HTTP.

Loaded by path (see `load()` users) so both tests/test_nix.py and tests/agent/ share
it without a package. Everything runs real nix (nix-bin 2.8 or newer) as root without
a daemon; each test session salts its systems so store paths never collide with other
test runs sharing /nix/store.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
FAKE_SYSTEM = HERE / "fake-system.nix"
# Offline, no daemon, no narinfo caching (ephemeral ports get reused between tests).
NIX_CONFIG = "\n".join(
    [
        "substituters =",
        "experimental-features = nix-command flakes",
        "narinfo-cache-negative-ttl = 0",
        "narinfo-cache-positive-ttl = 0",
    ]
)
RUN_ID = uuid.uuid4().hex[:10]
# How Nix refuses an unsigned or wrongly signed path: "lacks a valid signature" up to
# 2.18 or so, "lacks a signature by a trusted key" in 2.26 (both run in CI).
UNTRUSTED = r"lacks a (valid signature|signature by a trusted key)"


def require_nix() -> None:
    """Fail (never skip) with the fix when nix is missing."""
    missing = [c for c in ("nix", "nix-store", "nix-env", "nix-build") if shutil.which(c) is None]
    if missing:
        raise AssertionError(
            f"{', '.join(missing)} not found: these tests need real Nix; "
            "install it with `apt-get install -y nix-bin` (Debian) and run as root"
        )


def nix_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "NIX_CONFIG": NIX_CONFIG, **extra}


def run(*argv: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        env=nix_env(),
        timeout=120,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, argv))} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def build_system(
    name: str, *, fail: bool = False, healthy: bool = True, extra: str = "", kernel: str = ""
) -> str:
    """Build a fake system; `name` is salted per test session so paths are fresh.

    `extra`: shell its switch runs after moving the current-system link. `kernel` gives
    it initrd/kernel/kernel-modules links named after that kernel.
    """
    proc = run(
        "nix-build",
        FAKE_SYSTEM,
        "--no-out-link",
        "--argstr",
        "salt",
        f"{name}-{RUN_ID}",
        "--arg",
        "fail",
        "true" if fail else "false",
        "--arg",
        "healthy",
        "true" if healthy else "false",
        "--argstr",
        "extra",
        extra,
        "--argstr",
        "kernel",
        kernel,
    )
    return proc.stdout.strip().splitlines()[-1]


def delete_from_store(path: str) -> None:
    """Make "a store that did not have it" after the path was pushed to a cache."""
    run("nix-store", "--delete", path)
    assert run("nix-store", "--check-validity", path, check=False).returncode != 0


def is_valid(path: str) -> bool:
    return run("nix-store", "--check-validity", path, check=False).returncode == 0


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class BinaryCache:
    """A file:// binary cache directory served over HTTP on 127.0.0.1."""

    def __init__(self, root: Path, key_name: str = "test-cache-1") -> None:
        self.dir = root / "cache"
        self.dir.mkdir(parents=True)
        self.secret_key = root / "cache.sk"
        self.public_key_file = root / "cache.pk"
        run(
            "nix-store",
            "--generate-binary-cache-key",
            key_name,
            self.secret_key,
            self.public_key_file,
        )
        self.public_key = self.public_key_file.read_text().strip()
        handler = functools.partial(_QuietHandler, directory=str(self.dir))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def file_url(self) -> str:
        return f"file://{self.dir}?compression=none"

    def push(self, path: str, *, sign: bool = True, key_file: Path | None = None) -> None:
        if sign:
            run(
                "nix",
                "store",
                "sign",
                "--recursive",
                "--key-file",
                key_file or self.secret_key,
                path,
            )
        run("nix", "copy", "--to", self.file_url, path)

    def tamper(self, path: str) -> None:
        """Flip the contents of the path's NAR (narinfo and signature left intact)."""
        narinfo = self.dir / (Path(path).name.split("-", 1)[0] + ".narinfo")
        url = next(
            line.split(": ", 1)[1]
            for line in narinfo.read_text().splitlines()
            if line.startswith("URL: ")
        )
        nar = self.dir / url
        data = bytearray(nar.read_bytes())
        marker = data.find(b"exit 0")
        assert marker >= 0, "fake system NAR layout changed"
        data[marker : marker + 6] = b"exit 1"
        nar.write_bytes(bytes(data))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def other_key(root: Path) -> tuple[Path, str]:
    """A second key pair nobody trusts."""
    sk, pk = root / "other.sk", root / "other.pk"
    run("nix-store", "--generate-binary-cache-key", "intruder-1", sk, pk)
    return sk, pk.read_text().strip()


@dataclass
class Machine:
    """Paths of one fake machine; `switch_log` lists every switch-to-configuration run."""

    root: Path
    profile: Path
    current_system: Path
    state_dir: Path
    switch_log: Path

    def install(self, path: str) -> None:
        """What the NixOS installer leaves behind: profile generation 1 and the link."""
        run("nix-env", "-p", self.profile, "--set", path)
        os.symlink(path, self.current_system)

    @property
    def current(self) -> str | None:
        link = self.current_system
        return os.path.realpath(link) if os.path.lexists(link) else None

    @property
    def profile_target(self) -> str:
        return os.path.realpath(self.profile)

    def switches(self) -> list[str]:
        return self.switch_log.read_text().splitlines() if self.switch_log.exists() else []

    def generations(self) -> list[str]:
        return sorted(p.name for p in self.profile.parent.glob("system-*-link"))
