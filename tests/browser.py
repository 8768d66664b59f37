"""Debian's Chromium, headless, driven by Playwright for Python: the operator page's tests.

Playwright never downloads a browser here: it starts /usr/bin/chromium (`apt-get install -y
chromium`) with the flags this machine needs, each context a new empty profile. A `Tab` keeps what
the console and the page reported, and writes screenshots under the test's tmp folder.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
INSTALL = "apt-get install -y chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Chromium logs each HTTP error answer to a fetch as a console error; a test that provokes one
# (a wrong key, a 409) allows exactly those statuses and nothing else.
_HTTP_ERROR = re.compile(r"^Failed to load resource: the server responded with a status of (\d+)")


def launch() -> Iterator[Any]:
    """A Chromium browser for a test session; skipped, with the command, where none is installed."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no Chromium at {CHROMIUM}: install it with `{INSTALL}` (README: Tests)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the dev extra's playwright")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class Tab:
    """One page in its own context (its own session storage), and what it logged."""

    page: Any
    shots: Path
    console: list[tuple[str, str]] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)

    def shot(self, name: str, full_page: bool = True) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=full_page)
        return path

    def errors(self, http_statuses: tuple[int, ...] = (), refused: bool = False) -> list[str]:
        """Uncaught exceptions and console errors, but HTTP answers with one of `http_statuses`
        (and refused connections, when `refused`)."""
        found = list(self.page_errors)
        for kind, text in self.console:
            status = _HTTP_ERROR.match(text)
            allowed = status is not None and int(status.group(1)) in http_statuses
            allowed |= refused and text.endswith("net::ERR_CONNECTION_REFUSED")
            if kind == "error" and not allowed:
                found.append(text)
        return found

    def wait_until(self, check: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
        """Poll `check` (Python, so the page's CSP needs no eval) until it returns truthy."""
        deadline = time.monotonic() + timeout
        while not (result := check()):
            if time.monotonic() > deadline:
                self.shot("timed-out")
                raise AssertionError(f"timed out waiting for {what or check}")
            time.sleep(0.05)
        return result


# Makes `document.hidden` settable (`window.setHidden(true)`), as a tab in the background has it.
HIDDEN_SWITCH = """
let hidden = false;
Object.defineProperty(Document.prototype, "hidden", { get: () => hidden, configurable: true });
window.setHidden = (value) => {
  hidden = value;
  document.dispatchEvent(new Event("visibilitychange"));
};
"""


def open_tab(
    browser: Any, url: str, shots: Path, init_script: str | None = None, **context: Any
) -> Tab:
    """`url` in a new context (viewport, color_scheme, ... from `context`), with `init_script`
    run before the page's own scripts."""
    shots.mkdir(parents=True, exist_ok=True)
    page = browser.new_context(**{"viewport": {"width": 1200, "height": 900}, **context}).new_page()
    if init_script:
        page.add_init_script(init_script)
    tab = Tab(page, shots)
    page.on("console", lambda message: tab.console.append((message.type, message.text)))
    page.on("pageerror", lambda error: tab.page_errors.append(str(error)))
    page.goto(url)
    return tab
