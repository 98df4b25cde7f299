"""The fleet page: counters by sync and health, and the status table, live."""

from __future__ import annotations

import falcon

from nixfleet import filters
from nixfleet.errors import FieldError, ValidationError
from nixfleet.models import Health, Lifecycle, Sync, utcnow
from nixfleet.store import fleet
from nixfleet.ui.web import Page, Viewer

REFRESH_SECONDS = 5
PER_PAGE = 50


def parse_query(req: falcon.Request) -> tuple[fleet.FleetQuery, dict[str, str | int]]:
    """The page's filters from its query string (filters.parse, as the CLI and API parse
    theirs), and the same as plain params for links."""
    tags_text = req.get_param("tags") or ""
    stale_text = req.get_param("stale") or ""
    f = filters.parse(
        tags=tags_text,
        lifecycle=req.get_param("lifecycle"),
        sync=req.get_param("sync"),
        health=req.get_param("health"),
        stale=stale_text,
        host=req.get_param("q"),
        sort=req.get_param("sort"),
        descending=req.get_param("dir") == "desc",
        names={"host": "q"},
    )
    try:
        page = req.get_param_as_int("page", min_value=1, max_value=1_000_000, default=1) or 1
    except falcon.HTTPInvalidParam:
        raise ValidationError(
            "invalid page", errors=[FieldError("page", "a whole number from 1")]
        ) from None
    q = fleet.FleetQuery(**vars(f), page=page, per_page=PER_PAGE)
    params = {
        "tags": tags_text,
        "lifecycle": f.lifecycle.value if f.lifecycle else "",
        "sync": f.sync.value if f.sync else "",
        "health": f.health.value if f.health else "",
        "stale": stale_text,
        "q": f.search,
        "sort": f.sort if f.sort != "host" else "",
        "dir": "desc" if f.descending else "",
        "page": page if page > 1 else "",
    }
    return q, params


class Fleet(Page):
    """GET /ui/ — the whole page; GET /ui/fleet/live — the part htmx refreshes."""

    template = "fleet.html"

    def get(self, req: falcon.Request, resp: falcon.Response, viewer: Viewer) -> None:
        q, params = parse_query(req)
        now = utcnow()
        settings = self.ui.ctx.settings
        with self.ui.ctx.store.read() as conn:
            result = fleet.page(conn, q, now, settings.stale_after)
            tags = fleet.all_tags(conn) if self.template == "fleet.html" else []
        pages = max(1, -(-result.matching // PER_PAGE))
        self.ui.render(
            resp,
            self.template,
            viewer=viewer,
            page=result,
            q=q,
            params=params,
            pages=pages,
            now=now,
            tags=tags,
            refresh=REFRESH_SECONDS,
            syncs=list(Sync),
            healths=list(Health),
            lifecycles=list(Lifecycle),
            sorts=list(fleet.SORTS),
            nav="fleet",
        )


class FleetLive(Fleet):
    template = "_fleet_live.html"
