"""Fleet status: desired vs current for every machine, plus a summary. Also /health and /metrics."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable

import falcon

from nixfleet import __version__
from nixfleet.api.auth import Perm
from nixfleet.api.context import Context
from nixfleet.api.machines import FILTER_QUERY, filter_params
from nixfleet.api.status_view import Pieces
from nixfleet.filters import MachineFilter
from nixfleet.models import Health as HealthAxis
from nixfleet.models import Lifecycle, Sync, isoformat, stale_cutoff, utcnow
from nixfleet.store import status


class Status:
    permissions = {"GET": Perm.READONLY}
    query = {"GET": FILTER_QUERY}

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Desired vs current generation and health of the machines asked for, and a summary."""
        f = filter_params(req)
        now = utcnow()
        stale = self.ctx.settings.stale_after
        view = self.ctx.status_view
        kept = view.document(now, stale) if view is not None and f == MachineFilter() else None
        pieces: Iterable[bytes]
        if kept is not None:  # the whole fleet, kept in memory
            heads, tails, c = kept
            pieces = itertools.chain.from_iterable(zip(heads, tails, strict=True))
            size = sum(map(len, heads)) + sum(map(len, tails))
        else:
            with self.ctx.store.read() as conn:
                doc = status.status_document(conn, f, now, stale)
            pieces, size, c = (doc.machines_json,), len(doc.machines_json), doc.counts
        head = {
            "generated_at": isoformat(now),
            "stale_after_seconds": stale,
            "summary": {
                "total": c.counted,
                "in_sync": c.by_sync[Sync.IN_SYNC],
                "updating": c.by_sync[Sync.UPDATING],
                "failed": c.by_sync[Sync.FAILED],
                "no_desired": c.by_sync[Sync.NO_DESIRED],
                "stale": c.stale,
                "by_health": {h.value: n for h, n in c.by_health.items()},
                "by_lifecycle": {s.value: n for s, n in c.by_lifecycle.items()},
            },
        }
        # The machines array is spliced in as the database wrote it (status_document,
        # or the entries status_view keeps), and sent a chunk at a time (Pieces).
        text = json.dumps(head, ensure_ascii=False).encode()
        start, end = text[:-1] + b', "machines": [', b"]}"
        resp.content_type = falcon.MEDIA_JSON
        resp.stream = Pieces(
            itertools.chain((start,), pieces, (end,)), len(start) + size + len(end)
        )
        resp.content_length = len(start) + size + len(end)


class Health:
    permissions = {"GET": Perm.PUBLIC}

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Liveness: the process answers (whether it can write is /ready's to say)."""
        resp.media = {"status": "ok", "version": __version__}


class Metrics:
    permissions = {"GET": Perm.PUBLIC}

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Prometheus text format gauges."""
        now = utcnow()
        cutoff = isoformat(stale_cutoff(now, self.ctx.settings.stale_after))
        with self.ctx.store.read() as conn:
            counts = status.counts(conn, "", [], cutoff)
        by_sync, by_lifecycle, stale = counts.by_sync, counts.by_lifecycle, counts.stale
        in_sync, failed = by_sync[Sync.IN_SYNC], by_sync[Sync.FAILED]
        drift = by_sync[Sync.UPDATING] + failed  # desired set, not running it
        lines = [
            "# HELP nixfleet_machines Machines known to the control plane, by lifecycle.",
            "# TYPE nixfleet_machines gauge",
            *(f'nixfleet_machines{{lifecycle="{s.value}"}} {by_lifecycle[s]}' for s in Lifecycle),
            "# HELP nixfleet_machines_in_sync Machines running their desired generation.",
            "# TYPE nixfleet_machines_in_sync gauge",
            f"nixfleet_machines_in_sync {in_sync}",
            "# HELP nixfleet_machines_out_of_sync Machines not yet on their desired generation.",
            "# TYPE nixfleet_machines_out_of_sync gauge",
            f"nixfleet_machines_out_of_sync {drift}",
            "# HELP nixfleet_machines_failed Machines whose desired generation failed there.",
            "# TYPE nixfleet_machines_failed gauge",
            f"nixfleet_machines_failed {failed}",
            "# HELP nixfleet_machines_health Machines by health (healthy, failing, unknown).",
            "# TYPE nixfleet_machines_health gauge",
            *(
                f'nixfleet_machines_health{{health="{h.value}"}} {counts.by_health[h]}'
                for h in HealthAxis
            ),
            "# HELP nixfleet_machines_sync Machines by sync state.",
            "# TYPE nixfleet_machines_sync gauge",
            *(f'nixfleet_machines_sync{{sync="{s.value}"}} {by_sync[s]}' for s in Sync),
            "# HELP nixfleet_machines_stale Machines whose agent went quiet (stale).",
            "# TYPE nixfleet_machines_stale gauge",
            f"nixfleet_machines_stale {stale}",
        ]
        resp.content_type = "text/plain; version=0.0.4"
        resp.text = "\n".join(lines) + "\n"
