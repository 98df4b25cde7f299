"""A real control plane with keys of every role, and a cookie-keeping HTTP session."""

from __future__ import annotations

import email.message
import http.cookiejar
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import ControlPlane
from ports import free_port

from nixfleet.models import utcnow
from nixfleet.store import Store, credentials
from ui import fleetdata


@dataclass
class Keys:
    admin: str
    deploy: str
    readonly: str


def start_cp(tmp_path: Path, settings: dict[str, Any] | None = None) -> tuple[ControlPlane, Keys]:
    db = tmp_path / "cp" / "nixfleet.db"
    db.parent.mkdir(parents=True)
    s = Store(db)
    with s.transaction() as conn:
        now = utcnow()
        keys = Keys(
            admin=credentials.create_key(conn, "ops", "admin", "test", now),
            deploy=credentials.create_key(conn, "ci", "deploy", "test", now),
            readonly=credentials.create_key(conn, "viewer", "readonly", "test", now),
        )
    s.close()
    extra = ["--reconcile-interval", "0.1"]
    if settings is not None:
        path = tmp_path / "cp" / "settings.json"
        path.write_text(json.dumps(settings))
        extra += ["--config", str(path)]
    cp = ControlPlane(
        db=db,
        port=free_port(),
        admin_key=keys.admin,
        log=tmp_path / "cp" / "cp.log",
        extra_args=extra,
    )
    cp.start()
    return cp, keys


@pytest.fixture
def ui_cp(tmp_path: Path) -> Iterator[tuple[ControlPlane, Keys]]:
    cp, keys = start_cp(tmp_path)
    fleetdata.build(cp.url, keys.admin)
    fleetdata.settle(cp.url, keys.admin)
    yield cp, keys
    cp.stop()


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


@dataclass
class Answer:
    status: int
    headers: email.message.Message  # case-insensitive, as HTTP headers are
    text: str


class Browserless:
    """What a browser does over HTTP, minus the browser: cookies, forms, no redirects."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(self.jar), NoRedirect()
        )

    def request(
        self,
        method: str,
        path: str,
        form: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if form is not None:
            req.add_header("Content-Type", "application/x-www-form-urlencoded")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with self.opener.open(req, timeout=10) as r:
                return Answer(r.status, r.headers, r.read().decode())
        except urllib.error.HTTPError as e:
            return Answer(e.code, e.headers, e.read().decode())

    def get(self, path: str, **kw: Any) -> Answer:
        return self.request("GET", path, **kw)

    def post(self, path: str, form: dict[str, str], **kw: Any) -> Answer:
        return self.request("POST", path, form=form, **kw)

    def login(self, key: str) -> Answer:
        page = self.get("/ui/login")
        return self.post("/ui/login", {"csrf": csrf_of(page.text), "api_key": key})

    def cookie(self, name: str) -> http.cookiejar.Cookie | None:
        return next((c for c in self.jar if c.name == name), None)


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, "no CSRF field in the page"
    return m.group(1)
