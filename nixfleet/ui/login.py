"""Login with an API key (→ a server-side session cookie) and logout."""

from __future__ import annotations

import logging
import secrets

import falcon

from nixfleet.models import utcnow
from nixfleet.store import credentials, sessions
from nixfleet.ui.web import COOKIE, LOGIN_COOKIE, PREFIX, Page, Viewer

log = logging.getLogger(__name__)


class Login(Page):
    roles = {"GET": None, "POST": None}  # the form's CSRF is a double-submit cookie

    def get(self, req: falcon.Request, resp: falcon.Response, viewer: Viewer | None) -> None:
        if viewer is not None:
            resp.status = falcon.HTTP_303
            resp.location = f"{PREFIX}/"
            return
        self._form(req, resp, 200, "")

    def _form(self, req: falcon.Request, resp: falcon.Response, status: int, error: str) -> None:
        token = secrets.token_urlsafe(24)
        resp.set_cookie(
            LOGIN_COOKIE,
            token,
            path=f"{PREFIX}/login",
            max_age=3600,
            secure=self.ui.secure(req),
            http_only=True,
            same_site="Strict",
        )
        self.ui.render(resp, "login.html", status, viewer=None, csrf=token, error=error)

    def post(self, req: falcon.Request, resp: falcon.Response, viewer: Viewer | None) -> None:
        key = self.form(req).get("api_key", "").strip()
        now = utcnow()
        found = None
        if key and len(key) <= 256 and not key.startswith(credentials.TOKEN_PREFIX):
            with self.ui.ctx.store.lookup() as conn:
                found = credentials.key_role(conn, key)
        if found is None:
            log.info("dashboard login refused from %s", req.remote_addr)
            self._form(req, resp, 401, "That API key is unknown or revoked.")
            return
        with self.ui.ctx.store.transaction() as conn:
            sessions.prune(conn, now, self.ui.ctx.settings.ui_session_idle)
            token = sessions.create(conn, found[0], now)
        log.info("dashboard login: key %s (%s)", found[0], found[1])
        resp.set_cookie(
            COOKIE,
            token,
            path=PREFIX,
            secure=self.ui.secure(req),
            http_only=True,
            same_site="Strict",
        )
        resp.unset_cookie(LOGIN_COOKIE, path=f"{PREFIX}/login", same_site="Strict")
        resp.status = falcon.HTTP_303
        resp.location = f"{PREFIX}/"


class Logout(Page):
    roles = {"POST": "readonly"}

    def post(self, req: falcon.Request, resp: falcon.Response, viewer: Viewer) -> None:
        token = req.cookies.get(COOKIE, "")
        with self.ui.ctx.store.transaction() as conn:
            sessions.delete(conn, token)
        resp.unset_cookie(COOKIE, path=PREFIX, same_site="Strict")
        resp.status = falcon.HTTP_303
        resp.location = f"{PREFIX}/login"
