"""Run the control plane: waitress serving the app, plus the background loop.

Shutdown on SIGTERM/SIGINT stops accepting connections, lets in-flight requests
finish (every acknowledged write is already committed: a response is only sent
after its transaction), stops the loop between ticks and closes the database.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType

from waitress.server import create_server

from nixfleet.api import create_app
from nixfleet.controlplane import background
from nixfleet.controlplane.config import Settings
from nixfleet.models import utcnow
from nixfleet.store import Store, audit, credentials

log = logging.getLogger("nixfleet.controlplane")


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
        ident="nixfleet",
        channel_timeout=60,
        connection_limit=1000,
        clear_untrusted_proxy_headers=True,
    )
    stop = threading.Event()
    loop = background.start(settings, store, stop)

    def _shutdown(signum: int, frame: FrameType | None) -> None:
        log.info("received signal %d, shutting down", signum)
        stop.set()
        server.close()

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
