"""Real-browser harness: one headless Chromium per test session, driven by Playwright, for ``tests/`` and
``mission_critical/`` (registered for both by the repository's root ``conftest.py``).

- ``chromium``: the session's browser (Debian's ``chromium`` at ``/usr/bin/chromium``, or ``BROKER_CHROMIUM``),
  launched through Playwright's ``executable_path``: Playwright's own browser download is never used. Where no
  Chromium is installed (``scripts/bootstrap.sh`` installs it where apt-get can), every test that needs it is
  skipped with the reason and a ``ChromiumMissingWarning`` in the warnings summary, never silently.
- ``pages``: a page factory. ``await pages.open(broker.http)`` opens a page *on the broker's origin* that has
  imported the JavaScript client from ``/client/broker.js`` (as ``window.broker``; ``window.wsUrl`` is the broker's
  WebSocket URL). The page loads the broker's ``/healthz`` and the test's HTML is written into that document, so
  the broker needs no test-only route and everything the page loads comes from the real broker.
- Each page is screenshotted when its test ends, into ``.artifacts/screenshots/`` (git-ignored); a page's uncaught
  errors fail its test (``BrowserPage.check()``).

Browser tests are ``async def`` and run on the session's event loop (the browser lives there):
``pytestmark = BROWSER`` in their module.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import pytest_asyncio

if TYPE_CHECKING:
    from playwright.async_api import Browser, BrowserContext, Page

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path(os.environ.get("BROKER_CHROMIUM", "/usr/bin/chromium"))
# --disable-background-networking and friends: without them Chromium keeps calling out (updates, sync, field
# trials), and on a closed network those refused connections slow it down and clutter its log.
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
SCREENSHOTS = ROOT / ".artifacts" / "screenshots"
LANDING_PATH = "/healthz"  # a page first loads this real broker response, then gets the test's HTML written in
LOAD_TIMEOUT_MS = 30_000  # a safety bound on a loaded machine, not a measurement

# Run a browser test on the session's event loop (where the browser lives).
BROWSER = pytest.mark.asyncio(loop_scope="session")


class ChromiumMissingWarning(UserWarning):
    """No Chromium here: the browser tests were skipped (see scripts/bootstrap.sh)."""


def chromium_missing() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        return (
            f"BROWSER TESTS SKIPPED: no Chromium at {CHROMIUM} (scripts/bootstrap.sh installs Debian's chromium "
            "package where apt-get can; or set BROKER_CHROMIUM to a Chromium binary)"
        )
    return None


def page_html(body: str = "") -> str:
    """A page that imports the client from the broker's origin and then runs ``body`` (HTML)."""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>broker browser test</title></head>
<body><h1>broker browser test</h1><pre id="log"></pre>
<script type="module">
import * as broker from "/client/broker.js";
window.broker = broker;
window.wsUrl = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/";
window.show = (line) => {{ document.getElementById("log").textContent += line + "\\n"; }};
window.brokerReady = true;
</script>
{body}
</body></html>"""


# A consumer running in the page: connects, subscribes, and acks every delivery (without waiting), recording each
# one in window.consumers[name] = {received: [{id, payload, attempt}], states, stale, errors, done}.
CONSUMER_JS = """async ({name, topic, group, prefetch, token}) => {
  const client = await broker.connect(wsUrl, {token, reconnectDeadlineMs: 120000});
  const run = {received: [], states: [], stale: 0, errors: [], done: false};
  client.addEventListener("statechange", (e) => run.states.push(e.detail.state));
  const sub = await client.subscribe(topic, {group, prefetch});
  (window.consumers ??= {})[name] = run;
  (window.clients ??= {})[name] = client;
  (async () => {
    try {
      for await (const m of sub) {
        run.received.push({id: m.id, payload: m.payload, attempt: m.attempt});
        try {
          await m.ack();
        } catch (e) {
          if (e instanceof broker.StaleReceiptError) run.stale++;  // its connection died: it comes back
          else run.errors.push(String(e));
        }
      }
    } catch (e) {
      run.errors.push(String(e));
    }
    run.done = true;
  })();
  return true;
}"""


class BrowserPage:
    """A Playwright page on the broker's origin, with the client imported, and what it said on its console."""

    def __init__(self, context: BrowserContext, page: Page, label: str) -> None:
        self.context = context
        self.page = page
        self.label = label
        self.console: list[str] = []
        self.errors: list[str] = []
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: self.errors.append(str(e)))

    async def evaluate(self, script: str, arg: Any = None) -> Any:
        """Run ``script`` (a JS function expression, may be async) in the page with ``arg``; its result."""
        return await self.page.evaluate(script, arg)

    async def wait_for(self, predicate: str, arg: Any = None, timeout_ms: float = LOAD_TIMEOUT_MS) -> Any:
        """Wait until the JS function ``predicate(arg)`` is truthy (``timeout_ms`` is a safety bound)."""
        handle = await self.page.wait_for_function(predicate, arg=arg, timeout=timeout_ms, polling=50)
        return await handle.json_value()

    async def start_consumer(
        self, topic: str, group: str, prefetch: int = 10, name: str = "main", token: str | None = None
    ) -> None:
        """Subscribe in the page and ack everything that arrives (see CONSUMER_JS); read it with ``consumed()``."""
        await self.evaluate(
            CONSUMER_JS, {"name": name, "topic": topic, "group": group, "prefetch": prefetch, "token": token}
        )

    async def consumed(self, name: str = "main") -> dict[str, Any]:
        """What the page's consumer ``name`` has received so far, and its connection states."""
        return dict(await self.evaluate("(name) => window.consumers[name]", name))

    def check(self) -> None:
        """Fail with what the page threw, if it threw anything uncaught."""
        assert not self.errors, f"{self.label}: uncaught errors in the page: {self.errors}\nconsole: {self.console}"


class Pages:
    """The page factory of one test: ``await pages.open(origin)``; screenshots and closes them all at the end."""

    def __init__(self, browser: Browser, test_name: str) -> None:
        self.browser = browser
        self.name = re.sub(r"[^A-Za-z0-9_.-]+", "_", test_name)[:120]
        self.opened: list[BrowserPage] = []

    async def open(
        self, origin: str, body: str = "", label: str | None = None, html: str | None = None
    ) -> BrowserPage:
        """A new page (its own context: no shared storage) on ``origin`` with the client imported; with ``html``,
        that whole document instead (not waited for: the test waits for what it shows)."""
        context = await self.browser.new_context(viewport={"width": 1024, "height": 700})
        page = await context.new_page()
        bp = BrowserPage(context, page, label or f"page{len(self.opened)}")
        self.opened.append(bp)
        # A real response of the broker first (its origin, and its loopback address space: Chromium's local network
        # access checks refuse a WebSocket to loopback from a page whose response came from nowhere, such as a
        # route's fulfilled body or a data: URL), then the test's HTML written into that same document.
        response = await page.goto(origin.rstrip("/") + LANDING_PATH, timeout=LOAD_TIMEOUT_MS)
        assert response is not None and response.ok, f"{origin}{LANDING_PATH}: {response and response.status}"
        await page.set_content(page_html(body) if html is None else html, timeout=LOAD_TIMEOUT_MS)
        if html is not None:
            return bp
        try:
            await page.wait_for_function("() => window.brokerReady === true", timeout=LOAD_TIMEOUT_MS)
        except Exception as e:
            raise AssertionError(f"{bp.label}: /client/broker.js did not load: {e}\nconsole: {bp.console}") from e
        return bp

    async def screenshot(self, page: BrowserPage, suffix: str = "") -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{self.name}-{page.label}{suffix}.png"
        await page.page.screenshot(path=str(path), full_page=True)
        return path

    async def close(self) -> None:
        for bp in self.opened:
            try:
                if not bp.page.is_closed():
                    await self.screenshot(bp)
            finally:
                await bp.context.close()
        self.opened.clear()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def chromium() -> AsyncIterator[Browser]:
    """The session's headless Chromium; skips (loudly) where none is installed."""
    reason = chromium_missing()
    if reason is not None:
        with warnings.catch_warnings():  # shown in the warnings summary, not turned into an error by the ini
            warnings.simplefilter("always", ChromiumMissingWarning)
            warnings.warn(ChromiumMissingWarning(reason), stacklevel=1)
        pytest.skip(reason)
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=list(CHROMIUM_ARGS), headless=True)
        try:
            yield browser
        finally:
            await browser.close()


@pytest_asyncio.fixture(loop_scope="session")
async def pages(chromium: Browser, request: pytest.FixtureRequest) -> AsyncIterator[Pages]:
    """The page factory of this test (screenshots saved and pages closed at its end)."""
    factory = Pages(chromium, request.node.nodeid.split("::", 1)[-1])
    try:
        yield factory
    finally:
        await factory.close()
