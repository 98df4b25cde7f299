"""The fleet page: counters by sync and health, and the status table, live."""

from __future__ import annotations

from enum import StrEnum
from typing import TypeVar

import falcon

from nixfleet.errors import FieldError, ValidationError
from nixfleet.models import TAG_RE, Health, Lifecycle, Sync, utcnow
from nixfleet.store import fleet
from nixfleet.ui.web import Page, Viewer

REFRESH_SECONDS = 5
PER_PAGE = 50
SEARCH_MAX = 128

E = TypeVar("E", bound=StrEnum)


def _enum(req: falcon.Request, name: str, kind: type[E]) -> E | None:
    value = req.get_param(name) or None
    if value is None:
        return None
    try:
        return kind(value)
    except ValueError:
        raise ValidationError(
            f"unknown {name} {value[:64]!r}",
            errors=[FieldError(name, f"one of: {', '.join(kind)}")],
        ) from None


def parse_tags(text: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """`prod,!canary` → carrying prod, not carrying canary (the CLI's --tags syntax)."""
    wanted: list[str] = []
    unwanted: list[str] = []
    for raw in text.replace(" ", ",").split(","):
        if not raw:
            continue
        negated = raw.startswith("!")
        tag = raw[1:] if negated else raw
        if not TAG_RE.match(tag):
            raise ValidationError(
                f"invalid tag {tag[:64]!r}",
                errors=[
                    FieldError(
                        "tags",
                        "comma-separated tags (letters, digits, . _ : -), "
                        "a leading ! excludes, e.g. prod,!canary",
                    )
                ],
            )
        (unwanted if negated else wanted).append(tag)
    return tuple(wanted), tuple(unwanted)


def parse_query(req: falcon.Request) -> tuple[fleet.FleetQuery, dict[str, str | int]]:
    """The page's filters from its query string, and the same as plain params for links."""
    tags_text = (req.get_param("tags") or "")[:1024]
    wanted, unwanted = parse_tags(tags_text)
    search = (req.get_param("q") or "").strip()
    if len(search) > SEARCH_MAX or "\x00" in search:
        raise ValidationError(
            "invalid host search", errors=[FieldError("q", f"at most {SEARCH_MAX} characters")]
        )
    stale_text = req.get_param("stale") or ""
    if stale_text not in ("", "yes", "no"):
        raise ValidationError("invalid stale filter", errors=[FieldError("stale", "yes or no")])
    sort = req.get_param("sort") or "host"
    if sort not in fleet.SORTS:
        raise ValidationError(
            f"unknown sort {sort[:64]!r}",
            errors=[FieldError("sort", f"one of: {', '.join(fleet.SORTS)}")],
        )
    try:
        page = req.get_param_as_int("page", min_value=1, max_value=1_000_000, default=1) or 1
    except falcon.HTTPInvalidParam:
        raise ValidationError(
            "invalid page", errors=[FieldError("page", "a whole number from 1")]
        ) from None
    descending = req.get_param("dir") == "desc"
    lifecycle = _enum(req, "lifecycle", Lifecycle)
    sync = _enum(req, "sync", Sync)
    health = _enum(req, "health", Health)
    q = fleet.FleetQuery(
        tags=wanted,
        not_tags=unwanted,
        lifecycle=lifecycle,
        sync=sync,
        health=health,
        stale=None if not stale_text else stale_text == "yes",
        search=search,
        sort=sort,
        descending=descending,
        page=page,
        per_page=PER_PAGE,
    )
    params: dict[str, str | int] = {
        "tags": tags_text,
        "lifecycle": lifecycle.value if lifecycle else "",
        "sync": sync.value if sync else "",
        "health": health.value if health else "",
        "stale": stale_text,
        "q": search,
        "sort": sort if sort != "host" else "",
        "dir": "desc" if descending else "",
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
