"""What every dashboard page shares: templates, static assets, headers, sessions, CSRF.

Pages are Falcon resources like the API's, but they authenticate with a session
cookie rather than a bearer key. The API's AuthMiddleware lets them through
(`Perm.PUBLIC`); Page._serve then requires a live session whose key has the role
the page (or action) needs, ranked exactly as the API ranks it (auth.ROLE_RANK),
and a CSRF token on every POST.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any
from urllib.parse import urlencode

import falcon
import jinja2

from nixfleet import __version__
from nixfleet.api.auth import ROLE_RANK, Actor, Perm
from nixfleet.api.context import Context
from nixfleet.errors import NixfleetError
from nixfleet.models import isoformat, utcnow
from nixfleet.store import sessions

log = logging.getLogger(__name__)

PREFIX = "/ui"
COOKIE = "nixfleet_session"
LOGIN_COOKIE = "nixfleet_login"  # the login form's double-submit CSRF value

# No inline script or style anywhere: every script and stylesheet is a file under
# /ui/static/, and htmx is configured (base.html's meta) not to inject its own style.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}


@dataclass(frozen=True)
class Asset:
    name: str  # as served: the content hash is part of it
    data: bytes
    content_type: str


def _assets() -> dict[str, Asset]:
    """Static files, each named with 12 hex of its SHA-256 so it may be cached for a year."""
    types = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
    out: dict[str, Asset] = {}
    for f in (resources.files("nixfleet.ui") / "static").iterdir():
        suffix = next((s for s in types if f.name.endswith(s)), None)
        if suffix is None:
            continue
        data = f.read_bytes()
        stem = f.name[: -len(suffix)]
        name = f"{stem}.{hashlib.sha256(data).hexdigest()[:12]}{suffix}"
        out[f.name] = Asset(name, data, types[suffix])
    return out


def csrf_token(session_token: str) -> str:
    """Derived from the session's secret, so it needs no storage and dies with the session."""
    return hmac.new(session_token.encode(), b"nixfleet-ui-csrf", hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Viewer:
    """Who is looking: the session's key, its role, and the page's CSRF token."""

    name: str
    role: str
    csrf: str

    def can(self, role: str) -> bool:
        return ROLE_RANK.get(self.role, 0) >= ROLE_RANK[role]

    @property
    def actor(self) -> Actor:
        return Actor("key", self.name, self.role)


def _ago(value: datetime | str | None, now: datetime | None = None) -> str:
    if value is None:
        return "never"
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    secs = int(((now or utcnow()) - value).total_seconds())
    if secs < 0:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{secs // size}{unit} ago"
    return f"{secs}s ago"


def _short(path: str | None) -> str:
    """/nix/store/<hash>-<name> → <hash:7>…-<name>, the CLI's short form."""
    if not path:
        return "-"
    base = path.rsplit("/", 1)[-1]
    digest, _, name = base.partition("-")
    return f"{digest[:7]}-{name}" if name else base[:12]


def _value(value: Any) -> str:
    """An audit or event detail value as JSON shows it (text as is)."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _time(value: datetime | str | None) -> str:
    if value is None:
        return ""
    text = value if isinstance(value, str) else isoformat(value) or ""
    return text[:19].replace("T", " ") + " UTC"


class UI:
    """The dashboard's shared parts, built once per app."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.assets = _assets()
        self.by_name = {a.name: a for a in self.assets.values()}
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("nixfleet.ui", "templates"),
            autoescape=True,  # every value, whatever the file name
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.globals.update(
            static=lambda name: f"{PREFIX}/static/{self.assets[name].name}",
            version=__version__,
            prefix=PREFIX,
        )
        self.env.filters.update(ago=_ago, short=_short, time=_time, query=self.query, value=_value)

    @staticmethod
    def query(params: Mapping[str, object], **changes: object) -> str:
        """The query string of params with changes applied (None or '' removes a key)."""
        merged = {**params, **changes}
        pairs = []
        for k, v in merged.items():
            if v is None or v == "" or v is False:
                continue
            for item in v if isinstance(v, list | tuple) else [v]:
                pairs.append((k, "1" if item is True else str(item)))
        return ("?" + urlencode(pairs)) if pairs else ""

    def render(self, resp: falcon.Response, template: str, code: int = 200, **values: Any) -> None:
        values.setdefault("viewer", None)
        values.setdefault("nav", "")
        resp.status = falcon.code_to_http_status(code)
        resp.content_type = falcon.MEDIA_HTML
        resp.set_header("Cache-Control", "no-store")
        resp.text = self.env.get_template(template).render(**values)

    def secure(self, req: falcon.Request) -> bool:
        return self.ctx.settings.ui_secure_cookie or req.scheme == "https"

    def viewer(self, req: falcon.Request, now: datetime) -> Viewer | None:
        token = req.cookies.get(COOKIE)
        if not token or not token.startswith(sessions.SESSION_PREFIX) or len(token) > 128:
            return None
        idle = self.ctx.settings.ui_session_idle
        with self.ctx.store.lookup() as conn:
            found = sessions.find(conn, token, now, idle)
        if found is None:
            return None
        if now - found.last_seen_at >= sessions.TOUCH_EVERY:
            with self.ctx.store.transaction() as conn:
                sessions.touch(conn, token, now)
        return Viewer(found.key_name, found.role, csrf_token(token))


Handler = Callable[..., None]


class Page:
    """A dashboard resource. `roles` maps a method to the least role it needs (None: anyone).

    Subclasses implement get/post(req, resp, viewer, **params); NixfleetErrors become
    an error page with their HTTP status (or, for an htmx request, a message fragment).
    """

    permissions = {"GET": Perm.PUBLIC, "POST": Perm.PUBLIC}  # checked here, not by the API
    roles: dict[str, str | None] = {"GET": "readonly"}
    template = ""

    def __init__(self, ui: UI) -> None:
        self.ui = ui

    def on_get(self, req: falcon.Request, resp: falcon.Response, **params: str) -> None:
        self._serve(req, resp, "GET", params)

    def on_post(self, req: falcon.Request, resp: falcon.Response, **params: str) -> None:
        self._serve(req, resp, "POST", params)

    def _serve(
        self, req: falcon.Request, resp: falcon.Response, method: str, params: dict[str, str]
    ) -> None:
        resp.set_headers(SECURITY_HEADERS)
        if method not in self.roles:
            raise falcon.HTTPMethodNotAllowed(list(self.roles))
        need = self.roles[method]
        viewer = self.ui.viewer(req, utcnow())
        htmx = req.get_header("HX-Request") == "true"
        if need is not None:
            if viewer is None:
                self._to_login(req, resp, htmx)
                return
            if method == "POST" and not self._csrf_ok(req, viewer.csrf):
                log.info("refused %s %r: bad CSRF token (%s)", method, req.path, viewer.name)
                self._error(resp, viewer, htmx, 403, "Forbidden", CSRF_REFUSED)
                return
            if not viewer.can(need):
                self._error(
                    resp,
                    viewer,
                    htmx,
                    403,
                    "Forbidden",
                    f"key {viewer.name!r} has role {viewer.role}; this needs {need} or higher",
                )
                return
        elif method == "POST" and not self._csrf_ok(req, req.cookies.get(LOGIN_COOKIE) or ""):
            self._error(resp, viewer, htmx, 403, "Forbidden", CSRF_REFUSED)
            return
        try:
            getattr(self, method.lower())(req, resp, viewer, **params)
        except NixfleetError as e:
            self._error(resp, viewer, htmx, e.http_status, e.title, str(e))

    def form(self, req: falcon.Request) -> dict[str, str]:
        """The url-encoded body, parsed once (the CSRF check reads it first)."""
        cached: dict[str, str] | None = getattr(req.context, "ui_form", None)
        if cached is None:
            cached = {}
            if (req.content_type or "").startswith("application/x-www-form-urlencoded"):
                media = req.get_media(default_when_empty={})
                cached = {k: v if isinstance(v, str) else v[-1] for k, v in media.items()}
            req.context.ui_form = cached
        return cached

    def _csrf_ok(self, req: falcon.Request, expected: str) -> bool:
        origin = req.get_header("Origin")
        if origin is not None and origin != f"{req.scheme}://{req.host}" + (
            f":{req.port}" if req.port not in (80, 443) else ""
        ):
            return False
        given = req.get_header("X-CSRF-Token") or self.form(req).get("csrf", "")
        return bool(expected) and hmac.compare_digest(given.encode(), expected.encode())

    def _to_login(self, req: falcon.Request, resp: falcon.Response, htmx: bool) -> None:
        target = f"{PREFIX}/login"
        if htmx:  # htmx follows this header with a full page load
            resp.status = falcon.HTTP_401
            resp.set_header("HX-Redirect", target)
            resp.text = ""
            return
        resp.status = falcon.HTTP_303
        resp.location = target
        resp.set_header("Cache-Control", "no-store")

    def _error(
        self,
        resp: falcon.Response,
        viewer: Viewer | None,
        htmx: bool,
        status: int,
        title: str,
        detail: str,
    ) -> None:
        template = "_message.html" if htmx else "error.html"
        if htmx:
            # htmx swaps only 2xx answers by default; the message goes to the flash slot.
            resp.set_header("HX-Retarget", "#flash")
            resp.set_header("HX-Reswap", "innerHTML")
        self.ui.render(
            resp,
            template,
            200 if htmx else status,
            viewer=viewer,
            title=title,
            detail=detail,
            status=status,
            kind="error",
        )


CSRF_REFUSED = (
    "the form's security token is missing or does not match this session "
    "(an old tab, or a request from another site); reload the page and try again"
)


class Static:
    """Hashed static files: immutable, cached for a year; an unknown name is a 404."""

    permissions = {"GET": Perm.PUBLIC}

    def __init__(self, ui: UI) -> None:
        self.ui = ui

    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        asset = self.ui.by_name.get(name)
        if asset is None:
            raise falcon.HTTPNotFound(description=f"no static file {name!r}")
        resp.set_headers(SECURITY_HEADERS)
        resp.content_type = asset.content_type
        resp.set_header("Cache-Control", "public, max-age=31536000, immutable")
        resp.data = asset.data
