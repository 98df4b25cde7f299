"""End to end in a real browser: Debian's chromium, headless, driven by Playwright,
against a real control plane on 127.0.0.1 (see tests/ui/browser.py for the flags).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from conftest import ControlPlane
from playwright.sync_api import BrowserContext, Dialog, Page, expect

from nixfleet.client import Client
from ui import fleetdata
from ui.browser import chromium, login
from ui.conftest import Keys


@pytest.fixture(scope="module")
def browser() -> Iterator[BrowserContext]:
    with chromium() as context:
        yield context


@pytest.fixture
def page(browser: BrowserContext) -> Iterator[Page]:
    browser.clear_cookies()
    p = browser.new_page()
    problems: list[str] = []
    # A CSP violation or script error shows up on the console: none may happen (a
    # refused login's 401 is the one error the console may show).
    p.on(
        "console",
        lambda m: (
            problems.append(m.text) if m.type == "error" and "status of 401" not in m.text else None
        ),
    )
    p.on("pageerror", lambda e: problems.append(str(e)))
    p.problems = problems  # type: ignore[attr-defined]
    yield p
    p.close()
    assert problems == []


def test_operator_journey(page: Page, ui_cp: tuple[ControlPlane, Keys]) -> None:
    cp, keys = ui_cp
    api = Client(cp.url, keys.admin)
    login(page, cp.url, keys.admin)
    expect(page.locator("header .key")).to_contain_text("ops")

    # Filter by tag, with a negation: db machines, not web ones.
    page.fill("#f-tags", "prod,!web")
    page.click("#apply")
    page.wait_for_url(re.compile(r"tags=prod%2C%21web"))
    hosts = page.locator("#status-table td.host a").all_inner_texts()
    assert hosts == ["db-01", "db-02", "evil-01"]
    expect(page.locator("#matching")).to_have_text("3 of 14 machines")

    # The table refreshes itself (htmx) and keeps the filter.
    with page.expect_response(re.compile(r"/ui/fleet/live\?tags=prod%2C%21web")) as live:
        pass
    assert live.value.status == 200
    assert page.locator("#status-table td.host a").all_inner_texts() == hosts

    # Open a machine: its failure and where it came from.
    page.click("text=db-02")
    page.wait_for_url(f"{cp.url}/ui/machines/db-02")
    expect(page.locator("#machine-id")).to_have_text("db-02")
    expect(page.locator("#machine-message")).to_have_text(
        "rolled back: postgresql.service failed to start"
    )
    expect(page.locator("#agent-tags")).to_contain_text("prod")
    expect(page.locator("#operator-tags")).to_contain_text("db")

    # A lifecycle action asks first; declining changes nothing, accepting does.
    page.once("dialog", lambda d: d.dismiss())
    page.click("#to-maintenance")
    expect(page.locator("#machine-lifecycle")).to_have_text("active")
    page.once("dialog", lambda d: d.accept())
    page.click("#to-maintenance")
    expect(page.locator("#machine-lifecycle")).to_have_text("maintenance")
    expect(page.locator("#flash")).to_contain_text("Lifecycle changed to maintenance")
    assert api.get("/api/v1/machines/db-02")["lifecycle"] == "maintenance"

    # Pause and resume the running rollout; the page changes in place.
    page.click("header nav >> text=Rollouts")
    page.click("#rollouts a")
    expect(page.locator("#rollout-status")).to_have_text("running")
    accept(page)
    page.click("#rollout-pause")
    expect(page.locator("#rollout-status")).to_have_text("paused")
    expect(page.locator("#rollout-resume")).to_be_visible()
    rid = page.url.rsplit("/", 1)[-1]
    assert api.get(f"/api/v1/rollouts/{rid}")["status"] == "paused"
    accept(page)
    page.click("#rollout-resume")
    expect(page.locator("#rollout-status")).to_have_text("running")
    expect(page.locator("#rollout-pause")).to_be_visible()
    assert api.get(f"/api/v1/rollouts/{rid}")["status"] == "running"
    expect(page.locator("#events")).to_contain_text("rollout-paused")
    expect(page.locator("#events")).to_contain_text("rollout-resumed")

    # The audit page shows what the dashboard did, as the key that did it.
    page.click("header nav >> text=Audit")
    expect(page.locator("#audit")).to_contain_text("machine.lifecycle")
    expect(page.locator("#audit")).to_contain_text("key:ops")

    # Log out: the session is gone, pages go back to the login form.
    page.click("#logout")
    page.wait_for_url(f"{cp.url}/ui/login")
    page.goto(f"{cp.url}/ui/")
    page.wait_for_url(f"{cp.url}/ui/login")


def accept(page: Page) -> None:
    def answer(d: Dialog) -> None:
        d.accept()

    page.once("dialog", answer)


def test_failing_login_stays_on_the_form(page: Page, ui_cp: tuple[ControlPlane, Keys]) -> None:
    cp, _ = ui_cp
    page.goto(f"{cp.url}/ui/")
    page.wait_for_url(f"{cp.url}/ui/login")
    page.fill("#api_key", "nfk_wrong")
    page.click("button[type=submit]")
    expect(page.locator("#login-error")).to_have_text("That API key is unknown or revoked.")
    page.goto(f"{cp.url}/ui/audit")
    page.wait_for_url(f"{cp.url}/ui/login")


def test_hostile_markup_is_text_in_the_browser(
    page: Page, ui_cp: tuple[ControlPlane, Keys]
) -> None:
    cp, keys = ui_cp
    dialogs: list[str] = []

    def answer(d: Dialog) -> None:
        dialogs.append(d.message)
        d.dismiss()

    page.on("dialog", answer)
    login(page, cp.url, keys.readonly)
    page.goto(f"{cp.url}/ui/machines/{fleetdata.HOSTILE_ID}")
    expect(page.locator("#machine-message")).to_have_text(fleetdata.HOSTILE_MESSAGE)
    expect(page.locator("td", has_text=fleetdata.HOSTILE_CHECK)).to_have_count(1)
    assert page.locator("#machine-message script, #machine-message img").count() == 0
    page.goto(f"{cp.url}/ui/?q=evil")
    page.wait_for_timeout(200)
    assert dialogs == []


def test_fleet_counters_equal_the_status_api(page: Page, ui_cp: tuple[ControlPlane, Keys]) -> None:
    cp, keys = ui_cp
    login(page, cp.url, keys.readonly)
    summary = Client(cp.url, keys.readonly).get("/api/v1/status")["summary"]
    shown = {
        key: int(page.locator(f"#count-{element} .n").inner_text())
        for key, element in [
            ("total", "total"),
            ("in_sync", "in-sync"),
            ("updating", "updating"),
            ("failed", "failed"),
            ("no_desired", "no-desired"),
            ("stale", "stale"),
        ]
    }
    assert shown == {k: summary[k] for k in shown}
    # A counter is a filter: clicking "failed" lists exactly the failed machines.
    page.click("#count-failed")
    expect(page.locator("#status-table td.host a")).to_have_text(["db-02"])
