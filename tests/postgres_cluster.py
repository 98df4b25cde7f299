"""A PostgreSQL server for the tests: the one given, or a throwaway cluster of our own.

`NIXFLEET_TEST_DATABASE_URL` (a `postgresql://` URL whose role may create databases)
names a server to use. Without it the harness starts its own cluster from the
`postgresql` binaries on this machine (Debian: /usr/lib/postgresql/<version>/bin,
installed by ./dev): `initdb` in a new temporary directory, the server on a free
port of 127.0.0.1 (its socket in that directory), run as an unprivileged user
when we are root (PostgreSQL refuses to run as root), and the directory removed
when the test session ends
(or the test process dies: see WATCHDOG). The cluster is for tests only: trust authentication
on 127.0.0.1 and no fsync (a test never survives the machine crashing; kill -9 of
a process, what the durability tests do, loses nothing with fsync off).

Each test gets a database of its own (`Server.create_database`): advisory locks and
LISTEN/NOTIFY channels, which the replicas' leader election and cache invalidation
use, are scoped to one database, so tests cannot see each other's.

Without a server or the binaries (or psycopg), the tests that need one are skipped
with the reason on a developer's machine and fail under CI (NIXFLEET_CI=1), as the
system tier does (tests/system/container.py).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pytest
from ports import free_port  # one home: tests/ports.py

URL_VAR = "NIXFLEET_TEST_DATABASE_URL"
BIN_GLOB = "/usr/lib/postgresql/*/bin"
UNPRIVILEGED = "nobody"  # the user our own cluster runs as when we are root
USER = "nixfleet"  # the cluster's superuser (initdb -U)
START_TIMEOUT = 60.0
# The server runs under this watchdog, whose stdin is a pipe from the test process:
# when that closes (stop(), or the test process killed, even by SIGKILL) it stops the
# server (fast shutdown) and removes the cluster's directory, so nothing is left.
WATCHDOG = """
root=$1; shift
"$@" <&- &
pid=$!
trap 'kill -INT "$pid" 2>/dev/null' TERM INT
read -r _ || true
kill -INT "$pid" 2>/dev/null
wait "$pid"
rm -rf "$root"
"""


def unavailable(message: str) -> None:
    """Skip (developer) or fail (CI) saying what is missing and how to get it."""
    if os.environ.get("NIXFLEET_CI") == "1":
        pytest.fail(message + " — under CI (NIXFLEET_CI=1) this is an error, not a skip")
    pytest.skip(message, allow_module_level=True)


def import_psycopg() -> ModuleType:
    """psycopg, for a test module (an older .venv without the extra skips, CI fails)."""
    try:
        import psycopg
    except ImportError:
        unavailable("psycopg is not installed: pip install -e '.[postgresql]' (./dev setup does)")
        raise
    return psycopg


def bin_dir() -> Path | None:
    """The newest PostgreSQL's bin directory here (Debian's layout, else PATH), or None."""
    found = [Path(p) for p in sorted(Path("/").glob(BIN_GLOB.lstrip("/")))]
    found = [p for p in found if (p / "initdb").is_file() and (p / "postgres").is_file()]
    if found:
        return max(found, key=lambda p: [int(x) for x in re.findall(r"\d+", p.parent.name)])
    initdb = shutil.which("initdb")
    if initdb and shutil.which("postgres"):
        return Path(initdb).parent
    return None


@dataclass
class Server:
    """A PostgreSQL server: `url` is its maintenance database; tests make their own."""

    url: str
    created: list[str] = field(default_factory=list)
    template: str | None = None  # a migrated, empty database new ones are copied from

    def database_url(self, name: str) -> str:
        parts = urllib.parse.urlsplit(self.url)
        return urllib.parse.urlunsplit(parts._replace(path="/" + name))

    def create_database(self, *, migrated: bool = False) -> str:
        """A new database (dropped by `drop_database`), empty or with the store's schema
        (`migrated`: a copy of a template migrated once per server, four times faster
        than migrating each); its URL."""
        import psycopg

        name = "nixfleet_test_" + secrets.token_hex(6)
        template = self._migrated_template() if migrated else "template0"
        with psycopg.connect(self.url, autocommit=True) as conn:
            # FILE_COPY: copying the template's files is faster than WAL-logging every
            # page of it (PostgreSQL 15's default) for a database this small.
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}" STRATEGY FILE_COPY')
        self.created.append(name)
        return self.database_url(name)

    def _migrated_template(self) -> str:
        if self.template is None:
            from nixfleet.store.pg import PgStore

            url = self.create_database()
            PgStore(url, max_size=1).close()  # no session may stay open on a template
            self.template = urllib.parse.urlsplit(url).path.lstrip("/")
        return self.template

    def drop_database(self, url: str) -> None:
        import psycopg

        name = urllib.parse.urlsplit(url).path.lstrip("/")
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if name in self.created:
            self.created.remove(name)


@dataclass
class Cluster:
    """A throwaway cluster of our own: `start()`, `server`, `stop()` (removes it all)."""

    bin: Path
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="nixfleet-pg-")))
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    # Tests lose nothing to a missing fsync; benchmarks compare with SQLite's WAL at
    # synchronous=NORMAL (no fsync per commit, none lost but by a machine crash): the
    # same promise is fsync on with synchronous_commit off.
    durable: bool = False

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    @property
    def server(self) -> Server:
        return Server(f"postgresql://{USER}@127.0.0.1:{self.port}/postgres")

    def _identity(self) -> tuple[int, int] | None:
        """(uid, gid) to run as: an unprivileged user when we are root, else ourselves."""
        if os.geteuid() != 0:
            return None
        import pwd

        entry = pwd.getpwnam(UNPRIVILEGED)
        return entry.pw_uid, entry.pw_gid

    def start(self) -> Server:
        ident = self._identity()
        if ident is not None:
            os.chown(self.root, *ident)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}
        subprocess.run(
            [
                str(self.bin / "initdb"),
                "--pgdata",
                str(self.data),
                "--username",
                USER,
                "--auth",
                "trust",
                "--encoding",
                "UTF8",
                "--no-locale",
                "--no-sync",
                "--no-instructions",
            ],
            check=True,
            capture_output=True,
            env=env,
            cwd=self.root,
            user=None if ident is None else ident[0],
            group=None if ident is None else ident[1],
        )
        logf = self.log.open("ab")
        if ident is not None:
            os.chown(self.log, *ident)
        self.proc = subprocess.Popen(
            [
                "/bin/sh",
                "-c",
                WATCHDOG,
                "nixfleet-pg-watchdog",
                str(self.root),
                str(self.bin / "postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"unix_socket_directories={self.root}",
                "-c",
                f"fsync={'on' if self.durable else 'off'}",
                "-c",
                "synchronous_commit=off",
                "-c",
                f"full_page_writes={'on' if self.durable else 'off'}",
                "-c",
                "max_connections=200",
            ],
            stdin=subprocess.PIPE,
            stdout=logf,
            stderr=logf,
            env=env,
            cwd=self.root,
            start_new_session=True,
            user=None if ident is None else ident[0],
            group=None if ident is None else ident[1],
        )
        logf.close()
        self._wait_ready()
        return self.server

    def _wait_ready(self) -> None:
        import psycopg

        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"postgres exited {self.proc.returncode}: {self.log.read_text()[-2000:]}"
                )
            try:
                with psycopg.connect(self.server.url, connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"postgres did not accept connections within {START_TIMEOUT:g} s: "
                        + self.log.read_text()[-2000:]
                    ) from None
                time.sleep(0.1)

    def stop(self) -> None:
        """Fast shutdown (SIGINT: disconnect clients, no waiting), then remove the files."""
        if self.proc is not None:
            if self.proc.poll() is None:
                assert self.proc.stdin is not None
                self.proc.stdin.close()  # the watchdog stops the server
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self._kill_server()
                    self.proc.kill()
                    self.proc.wait(timeout=30)
            self.proc = None
        shutil.rmtree(self.root, ignore_errors=True)

    def _kill_server(self) -> None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            os.kill(pid, signal.SIGKILL)


def server_or_skip() -> tuple[Server, Cluster | None]:
    """The server to test against and, when we started it, its cluster (to stop)."""
    import_psycopg()
    given = os.environ.get(URL_VAR)
    if given:
        return Server(given), None
    found = bin_dir()
    if found is None:
        unavailable(
            f"no PostgreSQL server: set {URL_VAR}, or install PostgreSQL's binaries "
            "(Debian: apt-get install postgresql; ./dev setup does as root)"
        )
        raise AssertionError("unreachable")
    cluster = Cluster(found)
    try:
        return cluster.start(), cluster
    except BaseException:
        cluster.stop()
        raise
