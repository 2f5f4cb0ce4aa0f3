"""The app's browser tests share this: Debian's Chromium driven by Playwright for Python, and a signed-in page.

Playwright's own browser download is not reachable everywhere, so the tests launch `/usr/bin/chromium`
through `executable_path`; where it or Playwright is missing, a test module skips and names the install.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from app_helpers import PASSWORDS

CHROMIUM = "/usr/bin/chromium"
INSTALL = "apt-get install -y chromium && pip install playwright"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def playwright_or_skip():
    """playwright.sync_api; at a module's top, skips the whole module when Chromium or Playwright is missing."""
    if shutil.which(CHROMIUM) is None:
        pytest.skip(f"no Chromium at {CHROMIUM}; install it with: {INSTALL}", allow_module_level=True)
    return pytest.importorskip("playwright.sync_api", reason=f"no Playwright; install it with: {INSTALL}")


@contextmanager
def chromium(playwright_api) -> Iterator:
    """A headless Chromium for the duration of the block."""
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            yield browser
        finally:
            browser.close()


def signed_in(browser, url: str, user: str, *, height: int = 900):
    """A new page of the app at `url`, logged in as `user` (one of app_helpers.PASSWORDS)."""
    page = browser.new_page(viewport={"width": 1280, "height": height})
    assert page.request.post(f"{url}/login", form={"username": user, "password": PASSWORDS[user]}).ok
    page.goto(url)
    page.wait_for_selector("#whoami:has-text('Signed in as')", timeout=30_000)
    return page
