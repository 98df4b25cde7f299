"""The dashboard over real HTTP (a real control plane on 127.0.0.1): sessions, roles,
CSRF, headers, escaping, the counters against the API. The browser tests are in
test_browser.py; these need no browser.
"""

from __future__ import annotations

import csv
import html.parser
import io
import re
import sqlite3
from pathlib import Path

import pytest
from conftest import ControlPlane

from nixfleet.client import Client
from ui import fleetdata
from ui.conftest import Browserless, Keys, csrf_of, start_cp

PAGES = ["/ui", "/ui/machines/db-02", "/ui/rollouts", "/ui/audit", "/ui/fleet/live"]


class Markup(html.parser.HTMLParser):
    """Collects what a CSP-strict page must not have: inline script, style, handlers."""

    def __init__(self) -> None:
        super().__init__()
        self.problems: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = {k for k, _ in attrs}
        if tag == "script":
            self._in_script = True
            if "src" not in names:
                self.problems.append("inline <script>")
        if tag == "style":
            self.problems.append("<style> element")
        for k in names:
            if k == "style" or k.startswith("on"):
                self.problems.append(f"{k}= attribute on <{tag}>")
            if k.startswith("hx-on"):
                self.problems.append(f"{k} (needs eval)")

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.problems.append("inline script body")


@pytest.fixture
def cp(ui_cp: tuple[ControlPlane, Keys]) -> ControlPlane:
    return ui_cp[0]


@pytest.fixture
def keys(ui_cp: tuple[ControlPlane, Keys]) -> Keys:
    return ui_cp[1]


def logged_in(cp: ControlPlane, key: str) -> Browserless:
    b = Browserless(cp.url)
    answer = b.login(key)
    assert answer.status == 303, answer.text
    assert answer.headers["Location"] == "/ui/"
    return b


def test_pages_need_a_session_and_redirect_to_login(cp: ControlPlane) -> None:
    b = Browserless(cp.url)
    for path in PAGES:
        answer = b.get(path)
        assert answer.status == 303, path
        assert answer.headers["Location"] == "/ui/login"
    # An htmx refresh of an expired session is told to load the login page.
    answer = b.get("/ui/fleet/live", headers={"HX-Request": "true"})
    assert answer.status == 401
    assert answer.headers["HX-Redirect"] == "/ui/login"


def test_login_sets_a_strict_http_only_session_cookie(cp: ControlPlane, keys: Keys) -> None:
    b = Browserless(cp.url)
    page = b.get("/ui/login")
    answer = b.post("/ui/login", {"csrf": csrf_of(page.text), "api_key": keys.readonly})
    assert answer.status == 303
    header = answer.headers["Set-Cookie"]
    assert "nixfleet_session=nfs_" in header
    assert "HttpOnly" in header
    assert "SameSite=Strict" in header
    assert "Path=/ui" in header
    assert "Secure" not in header  # plain http on loopback; see the next test
    assert keys.readonly not in header
    for path in PAGES:
        assert b.get(path).status == 200, path


def test_secure_cookie_when_configured(tmp_path: Path) -> None:
    cp, keys = start_cp(tmp_path, {"ui_secure_cookie": True})
    try:
        b = Browserless(cp.url)
        page = b.get("/ui/login")
        header = page.headers["Set-Cookie"]
        assert "; Secure" in header
        # A cookie jar keeps Secure cookies off plain http, as a browser does; send it by hand.
        login_cookie = header.split(";")[0]
        answer = b.post(
            "/ui/login",
            {"csrf": csrf_of(page.text), "api_key": keys.admin},
            headers={"Cookie": login_cookie},
        )
        assert answer.status == 303
        assert "; Secure" in answer.headers["Set-Cookie"]
    finally:
        cp.stop()


def test_failing_login_is_401_and_opens_no_session(cp: ControlPlane, keys: Keys) -> None:
    b = Browserless(cp.url)
    for key in ("nfk_not-a-key", "", keys.readonly + "x"):
        page = b.get("/ui/login")
        answer = b.post("/ui/login", {"csrf": csrf_of(page.text), "api_key": key})
        assert answer.status == 401
        assert "unknown or revoked" in answer.text
        assert b.cookie("nixfleet_session") is None
    # A machine token is not an operator key.
    token = Client(cp.url, keys.admin).post(
        "/api/v1/machines", {"id": "tok-01", "issue_token": True}
    )["token"]
    page = b.get("/ui/login")
    assert b.post("/ui/login", {"csrf": csrf_of(page.text), "api_key": token}).status == 401


def test_login_without_its_csrf_cookie_is_refused(cp: ControlPlane, keys: Keys) -> None:
    b = Browserless(cp.url)
    answer = b.post("/ui/login", {"csrf": "forged", "api_key": keys.admin})
    assert answer.status == 403
    assert b.cookie("nixfleet_session") is None


def test_logout_ends_the_session_server_side(cp: ControlPlane, keys: Keys) -> None:
    b = logged_in(cp, keys.readonly)
    stolen = b.cookie("nixfleet_session")
    assert stolen is not None
    page = b.get("/ui")
    answer = b.post("/ui/logout", {"csrf": csrf_of(page.text)})
    assert answer.status == 303
    assert answer.headers["Location"] == "/ui/login"
    assert b.get("/ui").status == 303
    # The old cookie value, replayed, opens nothing: the row is gone.
    replay = Browserless(cp.url)
    replay.jar.set_cookie(stolen)
    assert replay.get("/ui").status == 303


def test_revoking_the_key_ends_its_sessions(cp: ControlPlane, keys: Keys) -> None:
    b = logged_in(cp, keys.readonly)
    assert b.get("/ui").status == 200
    Client(cp.url, keys.admin).request("DELETE", "/api/v1/keys/viewer")
    assert b.get("/ui").status == 303


def lifecycle_of(cp: ControlPlane, host: str) -> str:
    value: str = cp.machine(host)["lifecycle"]
    return value


def test_csrf_token_is_required_for_every_mutation(cp: ControlPlane, keys: Keys) -> None:
    b = logged_in(cp, keys.admin)
    other = logged_in(cp, keys.admin)
    page = b.get("/ui/machines/web-02")
    token = csrf_of(page.text)
    foreign = csrf_of(other.get("/ui/machines/web-02").text)
    assert token != foreign
    path = "/ui/machines/web-02/lifecycle"
    for form in (
        {"lifecycle": "maintenance"},
        {"lifecycle": "maintenance", "csrf": ""},
        {"lifecycle": "maintenance", "csrf": "0" * 64},
        {"lifecycle": "maintenance", "csrf": foreign},  # another session's token
    ):
        answer = b.post(path, form)
        assert answer.status == 403, form
        assert "security token" in answer.text
    assert lifecycle_of(cp, "web-02") == "active"
    # htmx mutations carry it as a header; a wrong one is refused the same way.
    rid = Client(cp.url, keys.admin).get("/api/v1/rollouts")["rollouts"][0]["id"]
    answer = b.post(f"/ui/rollouts/{rid}/pause", {}, headers={"X-CSRF-Token": foreign})
    assert answer.status == 403
    assert Client(cp.url, keys.admin).get(f"/api/v1/rollouts/{rid}")["status"] == "running"
    # A cross-site Origin is refused even with the right token.
    answer = b.post(
        path,
        {"lifecycle": "maintenance", "csrf": token},
        headers={"Origin": "https://evil.example"},
    )
    assert answer.status == 403
    assert lifecycle_of(cp, "web-02") == "active"
    # And with the token, it works, as the API's own PATCH does (audit row included).
    answer = b.post(path, {"lifecycle": "maintenance", "csrf": token})
    assert answer.status == 303
    assert lifecycle_of(cp, "web-02") == "maintenance"
    entries = Client(cp.url, keys.admin).get("/api/v1/audit", target="web-02")["entries"]
    assert entries[0]["action"] == "machine.lifecycle"
    assert entries[0]["actor"] == "key:ops"


def test_roles_as_in_the_api(cp: ControlPlane, keys: Keys) -> None:
    api = Client(cp.url, keys.admin)
    rid = api.get("/api/v1/rollouts")["rollouts"][0]["id"]
    viewer = logged_in(cp, keys.readonly)
    deployer = logged_in(cp, keys.deploy)
    # readonly: sees everything, changes nothing, and is offered no buttons.
    page = viewer.get("/ui/machines/web-03")
    assert page.status == 200
    assert "to-maintenance" not in page.text
    assert "rollout-pause" not in viewer.get(f"/ui/rollouts/{rid}").text
    token = csrf_of(page.text)
    answer = viewer.post(
        "/ui/machines/web-03/lifecycle", {"lifecycle": "maintenance", "csrf": token}
    )
    assert answer.status == 403
    assert "needs admin" in answer.text
    answer = viewer.post(f"/ui/rollouts/{rid}/pause", {"csrf": token})
    assert answer.status == 403
    assert "needs deploy" in answer.text
    # deploy: may pause, may not change a lifecycle.
    page = deployer.get(f"/ui/rollouts/{rid}")
    assert "rollout-pause" in page.text
    dtoken = csrf_of(page.text)
    answer = deployer.post(
        "/ui/machines/web-03/lifecycle", {"lifecycle": "maintenance", "csrf": dtoken}
    )
    assert answer.status == 403
    assert deployer.post(f"/ui/rollouts/{rid}/pause", {"csrf": dtoken}).status == 303
    assert api.get(f"/api/v1/rollouts/{rid}")["status"] == "paused"
    assert lifecycle_of(cp, "web-03") == "active"
    audit = api.get("/api/v1/audit", actor="key:ci")["entries"]
    assert audit[0]["action"].startswith("rollout.")


def test_api_errors_become_pages_with_their_status(cp: ControlPlane, keys: Keys) -> None:
    b = logged_in(cp, keys.admin)
    assert b.get("/ui/machines/nope-01").status == 404
    assert b.get("/ui/rollouts/ro-000000000000").status == 404
    assert b.get("/ui/machines/bad%20name").status == 422
    answer = b.get("/ui?sync=sideways")
    assert answer.status == 422
    assert "in-sync" in answer.text and "sideways" in answer.text  # the value, the allowed ones
    assert b.get("/ui?tags=Bad%20Tag!").status == 422
    token = csrf_of(b.get("/ui/machines/edge-02").text)
    # An invalid transition is the API's 409, with its message.
    answer = b.post("/ui/machines/edge-02/lifecycle", {"lifecycle": "maintenance", "csrf": token})
    assert answer.status == 409
    assert "cannot go from pending to maintenance" in answer.text


def test_every_page_has_a_strict_csp_and_no_inline_code(cp: ControlPlane, keys: Keys) -> None:
    b = logged_in(cp, keys.admin)
    rid = Client(cp.url, keys.admin).get("/api/v1/rollouts")["rollouts"][0]["id"]
    for path in [*PAGES, "/ui/login", f"/ui/rollouts/{rid}", "/ui/machines/evil-01"]:
        answer = b.get(path) if path != "/ui/login" else Browserless(cp.url).get(path)
        assert answer.status == 200, path
        csp = answer.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp
        assert "style-src 'self'" in csp
        assert "unsafe" not in csp
        assert "frame-ancestors 'none'" in csp
        assert answer.headers["X-Frame-Options"] == "DENY"
        assert answer.headers["Cache-Control"] == "no-store"
        parser = Markup()
        parser.feed(answer.text)
        assert parser.problems == [], path


def test_static_files_are_hashed_and_cached_for_a_year(cp: ControlPlane, keys: Keys) -> None:
    b = logged_in(cp, keys.admin)
    page = b.get("/ui").text
    names = sorted(set(re.findall(r"/ui/static/([\w.-]+)", page)))
    assert len(names) == 3, names
    assert any(n.startswith("htmx.min.") for n in names), names
    for name in names:
        assert re.fullmatch(r"(app|htmx\.min)\.[0-9a-f]{12}\.(js|css)", name), name
        answer = Browserless(cp.url).get(f"/ui/static/{name}")
        assert answer.status == 200
        assert answer.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert Browserless(cp.url).get("/ui/static/htmx.min.js").status == 404  # unhashed name


def test_fleet_counters_match_the_status_api(cp: ControlPlane, keys: Keys) -> None:
    # A decommissioned machine is listed but never counted (DESIGN §3), on both sides.
    admin = Client(cp.url, keys.admin)
    admin.register_machine("retired-01", tags=[], lifecycle="pending", issue_token=False)
    admin.set_lifecycle("retired-01", "decommissioned")
    b = logged_in(cp, keys.readonly)
    summary = Client(cp.url, keys.readonly).get("/api/v1/status")["summary"]
    page = b.get("/ui").text
    ids = {
        "total": "count-total",
        "in_sync": "count-in-sync",
        "updating": "count-updating",
        "failed": "count-failed",
        "no_desired": "count-no-desired",
        "stale": "count-stale",
    }
    for field, element in ids.items():
        m = re.search(rf'id="{element}"><span class="n">(\d+)</span>', page)
        assert m, element
        assert int(m.group(1)) == summary[field], field
    assert summary["failed"] == 1 and summary["updating"] >= 1  # the fleet is varied
    for health, n in summary["by_health"].items():
        m = re.search(rf'id="count-{health}"><span class="n">(\d+)</span>', page)
        assert m and int(m.group(1)) == n, health
    assert "retired-01" in b.get("/ui?q=retired").text  # listed all the same


def test_hostile_markup_is_escaped(cp: ControlPlane, keys: Keys) -> None:
    # Tags cannot carry markup through the API (the tag pattern); put one in the
    # database directly, as an older version or a bug might have, to prove the page.
    with sqlite3.connect(cp.db) as conn:
        conn.execute(
            "INSERT INTO machine_tag_rows (machine, tag, source) SELECT num, ?, 2 "
            "FROM machine_numbers WHERE machine_id = ?",
            (fleetdata.HOSTILE_TAG, fleetdata.HOSTILE_ID),
        )
    b = logged_in(cp, keys.admin)
    for path in ("/ui", "/ui/machines/evil-01", "/ui?q=evil"):
        text = b.get(path).text
        assert "<script>alert" not in text
        assert "<img src=x" not in text
        assert "<b>tag</b>" not in text
        assert "&lt;b&gt;tag&lt;/b&gt;" in text
    machine = b.get("/ui/machines/evil-01").text
    assert "&lt;script&gt;alert(&#34;pwned&#34;)&lt;/script&gt;" in machine
    assert "&lt;img src=x onerror=alert(&#34;check&#34;)&gt;" in machine


def test_audit_csv_export_guards_against_formulas(cp: ControlPlane, keys: Keys) -> None:
    api = Client(cp.url, keys.admin)
    api.post("/api/v1/machines", {"id": "sheet-01", "tags": ["x"]})
    b = logged_in(cp, keys.readonly)
    answer = b.get("/ui/audit?target=sheet-01&format=csv")
    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("text/csv")
    assert "attachment" in answer.headers["Content-Disposition"]
    rows = list(csv.reader(io.StringIO(answer.text)))
    assert rows[0] == ["id", "at", "actor", "action", "target", "detail"]
    assert [r[3] for r in rows[1:]] == ["machine.register"]
    # A detail starting with a formula character is quoted, as `nixfleet audit --csv` does.
    with sqlite3.connect(cp.db) as conn:
        conn.execute(
            "INSERT INTO audit (at, actor, action, target, detail_json) VALUES "
            "('2026-01-01T00:00:00.000000Z', '=HYPERLINK(\"x\")', 'x.y', 'sheet-01', '{}')"
        )
    rows = list(csv.reader(io.StringIO(b.get("/ui/audit?target=sheet-01&format=csv").text)))
    assert '\'=HYPERLINK("x")' in [r[2] for r in rows]
    page = b.get("/ui/audit?action=machine.register").text
    assert "sheet-01" in page


def test_ui_false_serves_no_ui_route(tmp_path: Path) -> None:
    cp, keys = start_cp(tmp_path, {"ui": False})
    try:
        b = Browserless(cp.url)
        for path in ("/ui", "/ui/login", "/ui/static/app.css"):
            answer = b.get(path)
            assert answer.status == 404, path
            assert answer.headers["Content-Type"] == "application/problem+json"
        assert Client(cp.url, keys.readonly).get("/api/v1/status")["summary"]["total"] == 0
    finally:
        cp.stop()
