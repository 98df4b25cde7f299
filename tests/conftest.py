"""Shared fixtures: a real SQLite store, a real control-plane process, the real CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import pty
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import pytest
from ports import free_port  # one home: tests/ports.py
from postgres_cluster import Server, server_or_skip

from nixfleet.client import Client
from nixfleet.database_url import DatabaseURL
from nixfleet.database_url import parse as database_url_parse
from nixfleet.models import utcnow
from nixfleet.store import Store, credentials, db, migrations, open_store
from nixfleet.store.conn import AnyStore

ROOT = Path(__file__).resolve().parent.parent


def load_file(name: str, path: Path) -> ModuleType:
    """A Python file that is not on the import path (bench scripts, tests/nix helpers)
    loaded once as module `name`; a unique name keeps it apart from same-named packages
    (bench/hostile.py vs tests/hostile/)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


# Ctrl-C reaches the processes the tests start as it does on a terminal. A harness
# started in the background by a script (`bash .ci/run &`) inherits SIGINT ignored,
# which exec passes on and Python then honours (no KeyboardInterrupt): the CLI's
# "Ctrl-C exits 130" tests would wait in vain. A handler, unlike SIG_IGN, is reset to
# the default in every exec'd child.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Real Nix runs offline here: no substituters (else each build waits on the public
# cache), flakes on. A developer's own NIX_CONFIG wins.
os.environ.setdefault("NIX_CONFIG", "substituters =\nexperimental-features = nix-command flakes")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `long` first, the system tier's before the others (a stable sort):
    pytest-xdist (./dev test) hands out tests in this order, and a test of minutes
    started last would end the run alone on one worker while the others wait. The
    longest, the nix-marked tests under the container's Nix, is a system test."""
    items.sort(
        key=lambda item: (
            item.get_closest_marker("long") is None,
            item.get_closest_marker("system") is None,
        )
    )


# The property of tests/system/test_nix_versions.py whose lines (which Nix ran what)
# end the session's output. Its report carries them to this process from a
# pytest-xdist worker; the hook lives here because the main process of a parallel
# run loads no conftest below tests/ (it collects nothing itself).
NIX_VERSIONS = "nix_versions"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Both Nix runs in the session's output: this machine's and the container's."""
    lines = [
        line
        for outcome in ("passed", "failed")
        for report in terminalreporter.stats.get(outcome, [])
        for name, value in getattr(report, "user_properties", ())
        if name == NIX_VERSIONS
        for line in value
    ]
    if lines:
        terminalreporter.section("Nix versions")
        for line in lines:
            terminalreporter.write_line(line)


@contextmanager
def store_before(path: Path, migration: str) -> Iterator[Store]:
    """A Store whose schema stops before `migration`, to write what older code wrote;
    closed on leaving (open it again to migrate the rest)."""
    old = [m for m in migrations.MIGRATIONS if m[0] < migration]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(migrations, "MIGRATIONS", old)
        mp.setattr(db, "MIGRATIONS", old)
        store = Store(path)
        try:
            yield store
        finally:
            store.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "nixfleet.db")
    yield s
    s.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AnyStore]:
    """A new, migrated store of each backend (the PostgreSQL one in a database of its own)."""
    if request.param == "sqlite":
        any_: AnyStore = Store(tmp_path / "nixfleet.db")
    else:
        url = request.getfixturevalue("migrated_postgres_url")  # skips (or fails) first
        from nixfleet.store.pg import PgStore

        any_ = PgStore(url, max_size=4)
    yield any_
    any_.close()


@pytest.fixture
def admin_key(store: Store) -> str:
    with store.transaction() as conn:
        return credentials.create_key(conn, "test-admin", "admin", "test", utcnow())


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Server]:
    """NIXFLEET_TEST_DATABASE_URL's server, else a throwaway cluster for the session
    (tests/postgres_cluster.py; skipped with the reason, or failed under CI, without)."""
    server, cluster = server_or_skip()
    try:
        yield server
    finally:
        if cluster is not None:
            cluster.stop()


@pytest.fixture
def postgres_url(postgres_server: Server) -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database of this test's own (dropped after)."""
    url = postgres_server.create_database()
    yield url
    postgres_server.drop_database(url)


@pytest.fixture
def migrated_postgres_url(postgres_server: Server) -> Iterator[str]:
    """As postgres_url, with the store's schema already in it (and nothing else)."""
    url = postgres_server.create_database(migrated=True)
    yield url
    postgres_server.drop_database(url)


T = TypeVar("T")


def wait_until(
    what: str, predicate: Callable[[], T], timeout: float = 60.0, interval: float = 0.05
) -> T:
    """Poll until `predicate` returns something true and return it; fail naming `what`.

    A deadline against hangs, not a timing assertion.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass
class ControlPlane:
    """A real `nixfleet-control-plane` process on 127.0.0.1 with its own database
    (the SQLite file `db`, or the PostgreSQL `database_url` when given)."""

    db: Path
    port: int
    admin_key: str
    log: Path
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    database_url: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        assert self.proc is None, "already running"
        logf = self.log.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nixfleet.controlplane.main",
                *(["--database-url", self.database_url] if self.database_url else []),
                *([] if self.database_url else ["--db", str(self.db)]),
                "--listen",
                f"127.0.0.1:{self.port}",
                *self.extra_args,
            ],
            stdout=logf,
            stderr=logf,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"control plane exited {self.proc.returncode}: {self.log.read_text()}"
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"control plane did not start: {self.log.read_text()}")

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        self.proc.wait(timeout=30)
        self.proc = None

    def client(self, token: str | None = None) -> Client:
        return Client(self.url, token or self.admin_key)

    def register(self, machine_id: str, tags: tuple[str, ...] | list[str] = ()) -> str:
        """Register a machine with an agent token; return the token."""
        m = self.client().post(
            "/api/v1/machines", {"id": machine_id, "tags": list(tags), "issue_token": True}
        )
        token: str = m["token"]
        return token

    def set_desired(self, machine_id: str, store_path: str, cache_url: str | None = None) -> None:
        self.client().request(
            "PUT",
            f"/api/v1/machines/{machine_id}/desired-generation",
            {"store_path": store_path, "cache_url": cache_url},
        )

    def machine(self, machine_id: str) -> dict[str, Any]:
        m: dict[str, Any] = self.client().get(f"/api/v1/machines/{machine_id}")
        return m


def new_control_plane(
    root: Path,
    *extra_args: str,
    settings: dict[str, Any] | None = None,
    database_url: str | None = None,
) -> ControlPlane:
    """A control plane (not yet started) over a new database — an SQLite file in `root`
    (which must not exist), or the empty PostgreSQL `database_url` — with the admin key
    `test-admin`; `settings` become its --config file."""
    root.mkdir(parents=True)
    db = root / "nixfleet.db"
    s = open_store(database_url_parse(database_url) if database_url else DatabaseURL("sqlite", db))
    with s.transaction() as conn:
        key = credentials.create_key(conn, "test-admin", "admin", "test", utcnow())
    s.close()
    args = list(extra_args)
    if settings is not None:
        (root / "settings.json").write_text(json.dumps(settings))
        args = ["--config", str(root / "settings.json"), *args]
    return ControlPlane(
        db=db,
        port=free_port(),
        admin_key=key,
        log=root / "cp.log",
        extra_args=args,
        database_url=database_url,
    )


@pytest.fixture
def control_plane(tmp_path: Path) -> Iterator[ControlPlane]:
    cp = new_control_plane(tmp_path / "cp")
    cp.start()
    yield cp
    cp.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_control_plane(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ControlPlane]:
    """`control_plane` on each backend (PostgreSQL: a database of the test's own)."""
    url = (
        request.getfixturevalue("migrated_postgres_url") if request.param == "postgresql" else None
    )
    cp = new_control_plane(tmp_path / "cp", database_url=url)
    cp.start()
    yield cp
    cp.stop()


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str, env: dict[str, str] | None = None, input: str | None = None) -> CliResult:
    """The real `nixfleet` CLI as a subprocess (what an operator runs)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("NIXFLEET_")}
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "nixfleet.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        input=input,
        timeout=120,
        check=False,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def run_on_tty(args: list[str], env: dict[str, str]) -> str:
    """Run the CLI with a pseudo-terminal as stdin, stdout and stderr; return what it printed."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "nixfleet.cli", *args],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env=env,
        close_fds=True,
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=60)
    os.close(leader)
    assert proc.returncode == 0
    return b"".join(chunks).decode()


def sql_writers(statement: str) -> dict[tuple[str, str], set[str]]:
    """The functions of nixfleet/ (but the migrations) holding SQL that matches the
    regular expression `statement`, each with the calls it makes: for tests that hold
    every writer of a column or table to what it must also write."""
    import ast
    import re

    root = Path(__file__).resolve().parent.parent
    pattern = re.compile(statement, re.S | re.I)
    found: dict[tuple[str, str], set[str]] = {}
    for path in sorted((root / "nixfleet").rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel == "nixfleet/store/migrations.py":
            continue
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, ast.FunctionDef):
                continue
            nodes = list(ast.walk(fn))
            if any(
                isinstance(n, ast.Constant) and isinstance(n.value, str) and pattern.search(n.value)
                for n in nodes
            ):
                found[(rel, fn.name)] = {
                    ast.unparse(n.func) for n in nodes if isinstance(n, ast.Call)
                }
    return found
