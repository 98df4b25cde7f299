"""The yardstick: a bare Falcon app on waitress with the control plane's server options.

It answers the report route with a constant JSON document after reading the body,
so the difference to the real control plane is exactly what nixfleet does per
report (auth, parsing, validation, the transaction), not HTTP or framework cost.

    python bench/bare_server.py --listen 127.0.0.1:18080 --threads 8 --workers 2

With --workers N it forks N-1 more processes accepting on the same socket, as the
control plane does (nixfleet.controlplane.server). With --db, `--work` adds the
least SQLite work a report could do, through nixfleet's own Store (bench/
ratio_bound.py compares them): `lookup` resolves the bearer token like the
control plane's authentication (one indexed SELECT), `write` also commits a
one-row UPDATE of the machine in a write transaction, and `commit` is that
transaction alone (the token known from memory, as the report cache knows it).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

import falcon
from waitress.server import create_server

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nixfleet.controlplane.server import SERVER_OPTIONS, _listen
from nixfleet.models import isoformat, utcnow
from nixfleet.store import Store, credentials

ANSWER = {"desired_generation": None, "cache_url": None, "poll_hint": 60}


class Report:
    def __init__(self, store: Store | None = None, work: str = "none") -> None:
        self.store, self.work = store, work

    def on_post(self, req: falcon.Request, resp: falcon.Response, machine_id: str) -> None:
        req.bounded_stream.read()
        if self.store is not None and self.work in ("lookup", "write"):
            token = (req.get_header("Authorization") or "").partition(" ")[2]
            with self.store.lookup() as conn:
                if credentials.token_machine(conn, token) != machine_id:
                    raise falcon.HTTPUnauthorized()
        if self.store is not None and self.work in ("write", "commit"):
            with self.store.transaction() as conn:
                conn.execute(
                    "UPDATE machines SET last_report_at = ? WHERE id = ?",
                    (isoformat(utcnow()), machine_id),
                )
        resp.media = ANSWER


class Health:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"status": "ok"}


def _exit_with(parent: int) -> None:
    """A worker ends when the process that forked it is gone."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--db", type=Path, help="a fleet database (bench/build_db.py)")
    parser.add_argument("--work", choices=("none", "lookup", "write", "commit"), default="none")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    sock = _listen(host, int(port))
    parent, children = os.getpid(), []
    for _ in range(args.workers - 1):
        pid = os.fork()
        if pid == 0:
            children = []
            threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
            break
        children.append(pid)

    def stop(signum: int, frame: object) -> None:
        for child in children:
            os.kill(child, signal.SIGTERM)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    app = falcon.App()
    app.add_route("/health", Health())
    store = Store(args.db) if args.db else None
    app.add_route("/api/v1/machines/{machine_id}/report", Report(store, args.work))
    server = create_server(app, sockets=[sock], threads=args.threads, **SERVER_OPTIONS)
    server.run()


if __name__ == "__main__":
    main()
