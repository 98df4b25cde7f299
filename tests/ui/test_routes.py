"""The /ui routes: exactly nixfleet.ui.PAGES plus static files, each guarded by a role."""

from __future__ import annotations

from pathlib import Path

import falcon.inspect

from nixfleet.api.app import create_app
from nixfleet.api.auth import ROLE_RANK
from nixfleet.settings import Settings
from nixfleet.store import Store
from nixfleet.ui import PAGES
from nixfleet.ui.web import PREFIX, Page, Static


def test_ui_routes_are_the_pages_and_each_method_names_its_role(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    try:
        app = create_app(Settings(), store)
        routes = [r for r in falcon.inspect.inspect_app(app).routes if r.path.startswith(PREFIX)]
    finally:
        store.close()
    served = {r.path for r in routes}
    assert served == {PREFIX + p for p, _ in PAGES} | {PREFIX + "/static/{name}"}
    for _, page in PAGES:
        assert issubclass(page, Page)
        assert page.roles, page
        for method, role in page.roles.items():
            assert method in ("GET", "POST")
            # None only for the login form itself, which has its own CSRF cookie.
            assert role in ROLE_RANK or (role is None and page.__name__ == "Login"), page
    assert Static.permissions == {"GET": Static.permissions["GET"]}
