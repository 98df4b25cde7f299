"""Run the control plane: waitress serving the app, plus the background loop.

With `workers` > 1 the primary process binds the socket, then forks workers that
accept on it too: one CPython process is bound to one core by the GIL, and the
report path is CPU-bound. Only the primary runs the background loop (reconciler,
GitOps, checkpoints); the processes share nothing but the SQLite file, whose
writes queue on a lock file (store.db.Store.transaction). A worker that dies takes
the service down with it (the primary stops the others and exits 1, for systemd
to restart); a worker whose primary died stops by itself.

Shutdown on SIGTERM/SIGINT stops accepting connections, lets in-flight requests
finish (every acknowledged write is already committed: a response is only sent
after its transaction; the heartbeats' last-seen times, queued for at most ~1 s,
are written last), stops the loop between ticks and closes the database.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, TypedDict

from waitress import wasyncore
from waitress.server import create_server

from nixfleet.api import create_app
from nixfleet.api.report_cache import ReportCache
from nixfleet.api.status_view import StatusView
from nixfleet.controlplane import background
from nixfleet.errors import ServiceError, ValidationError
from nixfleet.models import utcnow
from nixfleet.settings import Settings
from nixfleet.store import audit, credentials, open_store
from nixfleet.store.conn import AnyStore

log = logging.getLogger("nixfleet.controlplane")


class WaitressOptions(TypedDict, total=False):
    """The keyword arguments of waitress.create_server that nixfleet sets."""

    ident: str
    channel_timeout: int
    connection_limit: int
    asyncore_use_poll: bool
    cleanup_interval: int
    clear_untrusted_proxy_headers: bool
    outbuf_overflow: int
    max_request_body_size: int
    max_request_header_size: int


# Shared with bench/bare_server.py, so the yardstick runs waitress exactly as we do.
SERVER_OPTIONS: WaitressOptions = {
    "ident": "nixfleet",
    "channel_timeout": 30,
    # Waitress stops accepting at its connection limit (new connections wait in the
    # backlog until one closes), so the cap must sit far above what an attacker's idle
    # sockets can hold while the idle timeout reaps them; ~1,100 idle sockets locked
    # agents out at the old 1,000. select() cannot watch descriptors past 1,024: poll.
    "connection_limit": 10_000,
    "asyncore_use_poll": True,
    "cleanup_interval": 5,
    "clear_untrusted_proxy_headers": True,
    # Responses up to 64 MiB stay in memory: the default (1 MiB) spooled the ~40 MiB
    # /api/v1/status body of a 100,000-machine fleet through a temporary file.
    "outbuf_overflow": 64 * 2**20,
}


def server_options(settings: Settings) -> WaitressOptions:
    """Waitress's options for these settings: its own limits, enforced before any work.

    The body limit is waitress's too (a declared Content-Length over it is answered
    413 before the body is read; waitress otherwise buffers up to 1 GiB to temporary
    files before the app sees the request). The connection cap is lowered to what
    the process's file-descriptor limit allows.
    """
    return {
        **SERVER_OPTIONS,
        "max_request_body_size": settings.max_body_bytes + 1,  # waitress refuses >= this
        "max_request_header_size": settings.max_header_bytes,
        "channel_timeout": settings.idle_timeout,
        "connection_limit": _connection_cap(settings.connection_limit),
    }


FD_RESERVE = 256  # database, WAL, lock file, logs, subprocesses: not for connections


def _connection_cap(wanted: int) -> int:
    """Raise the soft descriptor limit as far as needed (and allowed); the cap it permits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
    if soft != resource.RLIM_INFINITY and soft < need:
        cap = max(16, soft - FD_RESERVE)
        log.warning(
            "connection_limit %d lowered to %d: the open-files limit is %d (raise LimitNOFILE)",
            wanted,
            cap,
            soft,
        )
        return cap
    return wanted


def install_admin_key(store: AnyStore, key_file: str) -> None:
    """The module's adminKeyFile: the first admin key, created on the host, never over HTTP."""
    try:
        key = Path(key_file).read_text().strip()
    except OSError as e:
        raise ServiceError(f"cannot read admin key file {key_file}: {e.strerror}") from e
    if len(key) < 24:
        raise ValidationError(
            f"admin key file {key_file} holds fewer than 24 characters; use a long random key"
        )
    now = utcnow()
    with store.transaction() as conn:
        if credentials.import_key(conn, "admin", "admin", key, "host", now):
            audit.record(conn, "host:admin-key-file", "key.create", "admin", now, {"role": "admin"})
            log.info("installed the admin key from %s", key_file)


def _close_connections(server: Any, grace: float = 10.0) -> None:
    """Let in-flight requests finish, then close every connection so run() returns."""
    dispatcher = server.task_dispatcher
    deadline = time.monotonic() + grace
    while (dispatcher.active_count or dispatcher.queue) and time.monotonic() < deadline:
        time.sleep(0.02)

    def close_all() -> None:
        for channel in list(server._map.values()):
            channel.close()  # the trigger too: an empty map ends the loop

    # The loop may already have ended and closed its trigger (no connection was left
    # open): then there is nothing to close, and writing to the trigger fails with EBADF.
    with contextlib.suppress(OSError):
        server.trigger.pull_trigger(close_all)


def _listen(host: str, port: int) -> socket.socket:
    """Bind before forking, so every worker accepts on the same socket (waitress listens).

    One address: a host name that resolves to several binds the first (use an
    address, e.g. `[::]:8470`, to choose).
    """
    family, kind, proto, _, addr = socket.getaddrinfo(
        host, port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        hint = (
            "another process (a running control plane?) listens there; stop it or choose "
            "another --listen HOST:PORT"
            if e.errno == errno.EADDRINUSE
            else "choose another --listen HOST:PORT"
        )
        raise ServiceError(f"cannot listen on {host}:{port}: {e.strerror}; {hint}") from e
    return sock


def serve(settings: Settings, *, init: bool = False) -> None:
    """Bind, check the database (quick_check; DatabaseFileError, exit 7), then serve."""
    # The port first: a port in use is one line, and no database file is created for it.
    sock = _listen(*settings.host_port)
    # Checks and migrations run once, before any fork.
    try:
        store = open_store(settings.database, init=init, check=True)
    except BaseException:
        sock.close()
        raise
    log.info("database %s", settings.database.display)
    if settings.admin_key_file:
        install_admin_key(store, settings.admin_key_file)
    store.close()  # no connection (or lock) crosses a fork
    primary = os.getpid()
    workers: list[int] = []
    for _ in range(settings.workers - 1):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                _run(settings, sock, primary=primary, workers=[])
                code = 0
            except BaseException:
                log.exception("worker %d failed", os.getpid())
            finally:
                logging.shutdown()
                os._exit(code)
        workers.append(pid)
    if workers:
        log.info("started %d worker processes: %s", len(workers), workers)
    _run(settings, sock, primary=None, workers=workers)


def _run(settings: Settings, sock: socket.socket, primary: int | None, workers: list[int]) -> None:
    """One serving process: the primary (primary=None, runs the background loop) or a worker."""
    store = open_store(
        settings.database,
        lock_timeout=settings.write_lock_timeout,
        connections=settings.threads + background.CONNECTIONS,
    )
    cache = ReportCache(store, settings.default_poll_interval)
    view = StatusView(store)
    app = create_app(settings, store, cache, view)
    server = create_server(
        app, sockets=[sock], threads=settings.threads, **server_options(settings)
    )
    stop = threading.Event()
    failed: list[str] = []
    interrupted: list[int] = []

    def shutdown() -> None:
        if stop.is_set():
            return
        stop.set()
        for pid in list(workers):  # the watcher thread removes the ones that exited
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        # Stop accepting, but keep the trigger: keep-alive connections still hold the loop
        # open, and _close_connections closes them through it once requests are done.
        server.trigger.pull_trigger(lambda: wasyncore.dispatcher.close(server))
        threading.Thread(target=_close_connections, args=(server,), daemon=True).start()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received signal %d, shutting down", signum)
        if signum == signal.SIGINT:
            interrupted.append(signum)
        # Not here: the handler may have interrupted the loop inside the trigger's lock.
        threading.Thread(target=shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    cache.start()
    # The whole fleet's status, loaded now rather than by the first request (~1-2 s at
    # 100,000 machines); a request meanwhile waits for it.
    threading.Thread(target=view.preload, name="nixfleet-status-view", daemon=True).start()
    loop = background.start(settings, store, stop) if primary is None else None
    if workers:
        threading.Thread(
            target=_watch_workers, args=(workers, stop, failed, shutdown), daemon=True
        ).start()
    if primary is not None:
        threading.Thread(target=_watch_primary, args=(primary, shutdown), daemon=True).start()
    host, port = sock.getsockname()[:2]
    log.info("listening on http://%s:%s", host, port)
    try:
        server.run()
    except OSError:
        if not stop.is_set():
            raise
    finally:
        stop.set()
        server.task_dispatcher.shutdown(cancel_pending=False, timeout=10)
        if loop is not None:
            loop.join(timeout=30)
        try:
            cache.close()  # the queued heartbeats' last-seen times
        except Exception:
            log.exception("could not write the last heartbeats' last-seen times")
        store.close()
        _reap(workers)
        log.info("stopped")
    if failed:
        raise ServiceError(f"stopped because {', '.join(failed)}")
    if interrupted and primary is None:
        raise KeyboardInterrupt  # stopped cleanly; the entry point exits 130 for Ctrl-C


def _watch_workers(
    workers: list[int], stop: threading.Event, failed: list[str], shutdown: Callable[[], None]
) -> None:
    """Primary: a worker that exits stops the whole service; one that failed, with exit 1.

    Polls its own children only (waitpid(-1) could reap a subprocess someone else
    waits for). A worker exits 0 only after a SIGTERM of its own: then the service
    is being stopped anyway (systemd signals every process of the unit).
    """
    while workers and not stop.is_set():
        for pid in list(workers):
            done, status = os.waitpid(pid, os.WNOHANG)
            if not done:
                continue
            workers.remove(pid)
            if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
                log.info("worker %d stopped; stopping the control plane", pid)
            else:
                failed.append(f"worker {pid} {_describe(status)}")
                log.error("worker %d %s; stopping the control plane", pid, _describe(status))
            shutdown()
        stop.wait(0.2)


def _watch_primary(primary: int, shutdown: Callable[[], None]) -> None:
    """Worker: the primary is gone (e.g. kill -9) when this process is re-parented."""
    while os.getppid() == primary:
        time.sleep(0.5)
    log.error("primary process %d is gone; stopping worker %d", primary, os.getpid())
    shutdown()


def _reap(workers: list[int], grace: float = 30.0) -> None:
    deadline = time.monotonic() + grace
    for pid in workers:
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                break
            if done:
                break
            time.sleep(0.05)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by signal {os.WTERMSIG(status)}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"
