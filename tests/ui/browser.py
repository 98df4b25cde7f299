"""Debian's chromium, headless, driven by Playwright (never `playwright install`)."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from playwright.sync_api import BrowserContext, Page, sync_playwright

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextlib.contextmanager
def chromium(width: int = 1440, height: int = 900) -> Iterator[BrowserContext]:
    """A fresh profile each time (Playwright passes it as --user-data-dir)."""
    with (
        tempfile.TemporaryDirectory(prefix="nixfleet-chromium-") as profile,
        sync_playwright() as p,
    ):
        context = p.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            args=ARGS,
            headless=True,
            viewport={"width": width, "height": height},
        )
        try:
            yield context
        finally:
            context.close()


def login(page: Page, base: str, key: str) -> None:
    page.goto(f"{base}/ui/login")
    page.fill("#api_key", key)
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/ui/")


def shots_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "docs" / "images"
