"""Run the control plane: waitress serving the app, plus the background loop.

Shutdown on SIGTERM/SIGINT stops accepting connections, lets in-flight requests
finish (every acknowledged write is already committed: a response is only sent
after its transaction), stops the loop between ticks and closes the database.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from waitress import wasyncore
from waitress.server import create_server

from nixfleet.api import create_app
from nixfleet.controlplane import background
from nixfleet.controlplane.config import Settings
from nixfleet.models import utcnow
from nixfleet.store import Store, audit, credentials

log = logging.getLogger("nixfleet.controlplane")

# Shared with bench/bare_server.py, so the yardstick runs waitress exactly as we do.
SERVER_OPTIONS: dict[str, Any] = {
    "ident": "nixfleet",
    "channel_timeout": 60,
    "connection_limit": 1000,
    "clear_untrusted_proxy_headers": True,
    # Responses up to 64 MiB stay in memory: the default (1 MiB) spooled the ~40 MiB
    # /api/v1/status body of a 100,000-machine fleet through a temporary file.
    "outbuf_overflow": 64 * 2**20,
}


def install_admin_key(store: Store, key_file: str) -> None:
    """The module's adminKeyFile: the first admin key, created on the host, never over HTTP."""
    key = Path(key_file).read_text().strip()
    if len(key) < 24:
        raise SystemExit(
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

    server.trigger.pull_trigger(close_all)


def serve(settings: Settings) -> None:
    store = Store(settings.db_path())
    log.info("database %s", store.path)
    if settings.admin_key_file:
        install_admin_key(store, settings.admin_key_file)
    app = create_app(settings, store)
    host, port = settings.host_port
    server = create_server(
        app,
        host=host,
        port=port,
        threads=settings.threads,
        **SERVER_OPTIONS,
    )
    stop = threading.Event()
    loop = background.start(settings, store, stop)

    def _shutdown(signum: int, frame: FrameType | None) -> None:
        log.info("received signal %d, shutting down", signum)
        stop.set()
        # Stop accepting, but keep the trigger: keep-alive connections still hold the loop
        # open, and _close_connections closes them through it once requests are done.
        wasyncore.dispatcher.close(server)
        threading.Thread(target=_close_connections, args=(server,), daemon=True).start()

    signal.signal(signal.SIGTERM, _shutdown)
    signal.signal(signal.SIGINT, _shutdown)
    bound = server.getsockname() if hasattr(server, "getsockname") else (host, port)
    log.info("listening on http://%s:%s", bound[0], bound[1])
    try:
        server.run()
    except OSError:
        if not stop.is_set():
            raise
    finally:
        stop.set()
        server.task_dispatcher.shutdown(cancel_pending=False, timeout=10)
        loop.join(timeout=30)
        store.close()
        log.info("stopped")
