"""CPU per report, in-process: the real app called through WSGI in a loop, no server.

Measures time.process_time per request (the figure a shared, loaded machine disturbs
least) for heartbeats and for state-changing reports, and optionally prints a
cProfile of each kind. The database is built by bench/build_db.py (copied first,
so the original stays as built).

    python bench/build_db.py --machines 100000 --out /tmp/fleet.db
    python bench/report_profile.py --db /tmp/fleet.db --reports 4000 [--profile change]
    python bench/report_profile.py --db /tmp/fleet.db --reports 500 --rounds 10 \
        --threads 8 --bound

--bound also runs state-changing reports (health turning: one event each) with their
transaction replaced, in alternation with the real ones: "minimal transaction" keeps
everything a commit costs here (write lock, file check, flock, BEGIN IMMEDIATE, one
UPDATE of the machine's row firing the view's trigger, the published rows, COMMIT,
the view's catch-up of that machine) but none of the report's own statements and
judgement; "no SQLite" skips the transaction altogether. What a report path with a
durable commit cannot go below, on this stack.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

import build_db  # noqa: E402
import fleet  # noqa: E402

from nixfleet.api import create_app  # noqa: E402
from nixfleet.api.report_cache import ReportCache  # noqa: E402
from nixfleet.settings import Settings  # noqa: E402
from nixfleet.store import Store, machines  # noqa: E402
from nixfleet.store import db as store_db  # noqa: E402

App = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def environ(i: int, body: bytes) -> dict[str, Any]:
    return {
        "REQUEST_METHOD": "POST",
        "SCRIPT_NAME": "",
        "PATH_INFO": f"/api/v1/machines/{fleet.hostname(i)}/report",
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8080",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(body)),
        "HTTP_AUTHORIZATION": f"Bearer {fleet.token(i)}",
        "HTTP_ACCEPT": "application/json",
        "wsgi.input": io.BytesIO(body),
        "wsgi.url_scheme": "http",
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }


def call(app: App, env: dict[str, Any]) -> str:
    status: list[str] = []

    def start(s: str, headers: list[tuple[str, str]], exc: Any = None) -> None:
        status.append(s)

    b"".join(app(env, start))
    return status[0]


# --bound: which transaction a report gets ("real", "minimal", "none").
MODE = {"tx": "real"}
_ANSWER = {
    "desired_generation": None,
    "desired_cache_url": None,
    "poll_hint": None,
    "retry_requested_at": None,
    "reboot": None,
    "confirm_timeout": None,
}
_record_report = machines.record_report
_transaction = store_db.Store.transaction


def _bound_record_report(conn: Any, report: Any) -> Any:
    if MODE["tx"] == "real":
        return _record_report(conn, report)
    if MODE["tx"] == "minimal":
        conn.execute(
            "UPDATE machines SET last_message = ? WHERE id = ?", (report.message, report.machine_id)
        )
    return _ANSWER, None


def _bound_transaction(self: Store) -> Any:
    if MODE["tx"] == "none":
        return contextlib.nullcontext(None)
    return _transaction(self)


def _serve(app: App, envs: list[dict[str, Any]]) -> None:
    for env in envs:
        s = call(app, env)
        if not s.startswith("200"):
            raise RuntimeError(f"report answered {s}")


def run(app: App, envs: list[dict[str, Any]], profile: bool, threads: int = 1) -> float:
    """CPU µs per request over envs (with `threads`: that many threads share them, as
    waitress's do, so every GIL hand-off of a SQLite call is paid as under load)."""
    prof = cProfile.Profile() if profile else None
    t0 = time.process_time()
    if prof is not None:
        prof.enable()
    if threads == 1:
        _serve(app, envs)
    else:
        workers = [
            threading.Thread(target=_serve, args=(app, envs[k::threads])) for k in range(threads)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    if prof is not None:
        prof.disable()
    cpu = time.process_time() - t0
    if prof is not None:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(35)
        print(out.getvalue(), file=sys.stderr)
    return cpu / len(envs) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--reports", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="request threads (8: waitress's)")
    parser.add_argument("--profile", choices=("heartbeat", "change", "none"), default="none")
    parser.add_argument(
        "--bound", action="store_true", help="also the two substituted transactions"
    )
    args = parser.parse_args()
    if args.bound:
        machines.record_report = _bound_record_report  # type: ignore[assignment]
        store_db.Store.transaction = _bound_transaction  # type: ignore[assignment,method-assign]
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "fleet.db"
        shutil.copy(args.db, db)
        store = Store(db)
        cache = ReportCache(store, 60)
        app = create_app(Settings(default_poll_interval=60), store, cache)
        t0 = time.process_time()
        cache.load()
        print(f"view loaded: {time.process_time() - t0:.2f} s CPU", file=sys.stderr)
        cache.start()  # its catch-up and flushes count, as in a server
        n = sum(1 for _ in store.connection().execute("SELECT 1 FROM machines"))
        reporters = [i for i in range(n) if build_db.reporting(i)]
        steady = [i for i in reporters if i % 2 == 0]
        changing = [i for i in reporters if i % 2 == 1]
        results: dict[str, list[float]] = {"heartbeat": [], "change": [], "change+event": []}
        if args.bound:
            results.update({"minimal transaction": [], "no SQLite": []})
        spare = changing[2 * args.reports * args.rounds :]
        for rnd in range(args.rounds):
            part = slice(rnd * args.reports, (rnd + 1) * args.reports)
            hb = [environ(i, fleet.report_bytes(i)) for i in steady[part]]
            # nonce even: only the message changes; odd: health turns too (an event).
            ch = [environ(i, fleet.change_bytes(i, 2 * rnd + 2)) for i in changing[part]]
            ev = [
                environ(i, fleet.change_bytes(i, 2 * rnd + 1))
                for i in changing[args.reports * args.rounds :][part]
            ]
            last = rnd == args.rounds - 1
            t = args.threads
            results["heartbeat"].append(run(app, hb, last and args.profile == "heartbeat", t))
            results["change"].append(run(app, ch, last and args.profile == "change", t))
            results["change+event"].append(run(app, ev, False, t))
            if args.bound:
                for k, (name, mode) in enumerate(
                    (("minimal transaction", "minimal"), ("no SQLite", "none"))
                ):
                    lo = (2 * rnd + k) * args.reports
                    same = [
                        environ(i, fleet.change_bytes(i, 2 * rnd + 1))
                        for i in spare[lo : lo + args.reports]
                    ]
                    MODE["tx"] = mode
                    results[name].append(run(app, same, False, t))
                    MODE["tx"] = "real"
        for name, values in results.items():
            print(
                f"{name:19s} CPU per report: median {statistics.median(values):6.0f} µs "
                f"({', '.join(f'{v:.0f}' for v in values)})"
            )
        cache.close()
        store.close()


if __name__ == "__main__":
    main()
