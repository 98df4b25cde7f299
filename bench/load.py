"""Load generator: separate processes, keep-alive http.client connections, bounded runs.

Each worker process owns `threads` connections; each connection sends requests one
after another (no pipelining) for machines of its own slice of the fleet, with that
machine's real token, so every report in a run comes from a distinct machine until
the fleet is exhausted. Runs stop after `duration` seconds or `max_requests`,
whichever comes first, and only ever talk to 127.0.0.1.
"""

from __future__ import annotations

import http.client
import multiprocessing as mp
import resource
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fleet

HOST = "127.0.0.1"


@dataclass
class LoadResult:
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    client_cpu_s: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def _requests(indices: list[int], nonce: int | None) -> list[tuple[str, bytes, dict[str, str]]]:
    out = []
    for i in indices:
        body = fleet.report_bytes(i) if nonce is None else fleet.change_bytes(i, nonce)
        headers = {
            "Authorization": f"Bearer {fleet.token(i)}",
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": "nixfleet-bench",
        }
        out.append((f"/api/v1/machines/{fleet.hostname(i)}/report", body, headers))
    return out


def _thread(
    port: int,
    reqs: list[tuple[str, bytes, dict[str, str]]],
    start_at: float,
    stop_at: float,
    limit: int,
    out: list[Any],
) -> None:
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    conn.connect()
    latencies: list[float] = []
    errors = 0
    n = len(reqs)
    while time.time() < start_at:
        time.sleep(0.001)
    k = 0
    while k < limit and time.time() < stop_at:
        path, body, headers = reqs[k % n]
        t0 = time.perf_counter()
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()
        latencies.append(time.perf_counter() - t0)
        if resp.status != 200:
            errors += 1
            if errors == 1:
                print(f"bench: HTTP {resp.status} for {path}", file=sys.stderr)
        k += 1
    out.append((latencies, errors, time.time()))
    conn.close()


def _process(
    port: int,
    slices: list[list[int]],
    start_at: float,
    stop_at: float,
    limit: int,
    queue: mp.Queue[Any],
    nonce: int | None,
) -> None:
    prepared = [_requests(s, nonce) for s in slices]
    out: list[Any] = []
    threads = [
        threading.Thread(target=_thread, args=(port, reqs, start_at, stop_at, limit, out))
        for reqs in prepared
    ]
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    queue.put((out, cpu))


def run(
    port: int,
    machines: list[int],
    *,
    processes: int = 2,
    threads: int = 4,
    duration: float = 5.0,
    max_requests: int = 50_000,
    offset: int = 0,
    change: int | None = None,
) -> LoadResult:
    """Drive POST .../report at the server on port; return throughput and latency.

    The bodies are what the database holds (heartbeats), or with `change` (a nonce)
    reports that change each machine's state (fleet.change_body).
    """
    conns = processes * threads
    per_conn = max(1, max_requests // conns)
    # Each connection gets a disjoint slice of machines; `offset` rotates the fleet so
    # successive runs report from machines that did not report in the previous run.
    rotated = machines[offset % len(machines) :] + machines[: offset % len(machines)]
    take = min(len(rotated), per_conn * conns)
    slices = [rotated[c:take:conns] or rotated[c % len(rotated) :: conns][:1] for c in range(conns)]
    prep_time = 0.5 + 0.00004 * take  # time to build bodies and tokens in the workers
    start_at = time.time() + prep_time
    stop_at = start_at + duration
    ctx = mp.get_context("fork")
    queue: mp.Queue[Any] = ctx.Queue()
    procs = [
        ctx.Process(
            target=_process,
            args=(
                port,
                slices[p * threads : (p + 1) * threads],
                start_at,
                stop_at,
                per_conn,
                queue,
                change,
            ),
        )
        for p in range(processes)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=duration + prep_time + 120) for _ in procs]
    for p in procs:
        p.join(timeout=10)
    latencies: list[float] = []
    errors = 0
    end = start_at
    cpu = 0.0
    for out, c in results:
        cpu += c
        for lat, err, finished in out:
            latencies.extend(lat)
            errors += err
            end = max(end, finished)
    latencies.sort()
    n = len(latencies)
    return LoadResult(
        requests=n,
        errors=errors,
        seconds=end - start_at,
        p50_ms=statistics.median(latencies) * 1000 if n else 0.0,
        p99_ms=latencies[min(n - 1, int(n * 0.99))] * 1000 if n else 0.0,
        client_cpu_s=cpu,
    )
